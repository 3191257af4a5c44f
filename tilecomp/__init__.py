"""tilecomp: compile a MiMo-style MoE LLM plus its DFlash speculative-decoding
step into one persistent GPU megakernel per decode step."""

__version__ = "0.1.0"
