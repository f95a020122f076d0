"""Tool use: tool schemas and calls (``schema``), how templates write and read them
(``formats``), the tools themselves (``builtin``), the call-result loop (``agent``) and the OS
sandbox that runs model-written code (``sandbox``)."""

from xtuner_lite.toolcalling.agent import ToolBox, ToolTurn, run_tool_turn, run_tool_turns
from xtuner_lite.toolcalling.builtin import BUILT_IN, Tool, ToolError, load_tools
from xtuner_lite.toolcalling.formats import TOOL_FORMATS, ParsedReply, get_tool_format
from xtuner_lite.toolcalling.schema import (
    ToolSpecError,
    function_schema,
    normalize_call,
    normalize_tools,
)

__all__ = [
    "BUILT_IN",
    "TOOL_FORMATS",
    "ParsedReply",
    "Tool",
    "ToolBox",
    "ToolError",
    "ToolSpecError",
    "ToolTurn",
    "function_schema",
    "get_tool_format",
    "load_tools",
    "normalize_call",
    "normalize_tools",
    "run_tool_turn",
    "run_tool_turns",
]
