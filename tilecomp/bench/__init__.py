"""`tilecomp bench`: the megakernel decode step against eager PyTorch, torch.compile and the floor."""
from .floor import StepBytes, step_bytes
from .run import format_table, run_bench, write_json

__all__ = ["StepBytes", "step_bytes", "run_bench", "format_table", "write_json"]
