"""tilecomp.ir: the graph IR (graph.py) and the tile IR (tile.py)."""
from .graph import (  # noqa: F401
    DType, Graph, Op, OpKind, TensorType, Value, infer_types, parse_graph, print_graph, verify_graph,
)
from .graph_build import GraphBuilder  # noqa: F401
from .tile import (  # noqa: F401
    Buffer, Counter, Dim, Region, Task, TileProgram, parse_tile, print_tile, verify_schedule, verify_tile,
)
