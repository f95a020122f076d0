import pytest

from xtuner_lite.data.map_fns import get_map_fn, validate_conversation
from xtuner_lite.errors import RowError, XtunerError


def test_alpaca_joins_input_and_keeps_system():
    conv = get_map_fn("alpaca")(
        {"instruction": "Add", "input": "1 2", "output": "3", "system": "Be brief."}
    )
    assert conv["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add\n1 2"},
        {"role": "assistant", "content": "3"},
    ]


def test_alpaca_zh_reads_chinese_keys():
    conv = get_map_fn("alpaca_zh")({"instruction_zh": "你好", "input_zh": "", "output_zh": "好"})
    assert [m["content"] for m in conv["messages"]] == ["你好", "好"]


def test_history_builds_every_turn():
    conv = get_map_fn("oasst1")(
        {"instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"]]}
    )
    assert [(m["role"], m["content"]) for m in conv["messages"]] == [
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
    ]


def test_openai_bare_list_and_loss_flag():
    conv = get_map_fn("openai")(
        [
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a", "loss": False},
            {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"},
        ]
    )
    assert conv["messages"][1]["loss"] is False and "loss" not in conv["messages"][3]


def test_sharegpt_roles_system_and_tools():
    conv = get_map_fn("sharegpt")(
        {
            "system": "S",
            "tools": '[{"name": "f", "parameters": {"type": "object"}}]',
            "conversations": [
                {"from": "human", "value": "u"},
                {"from": "function_call", "value": '{"name": "f", "arguments": {"x": 1}}'},
                {"from": "observation", "value": "o"},
                {"from": "gpt", "value": "a"},
            ],
        }
    )
    roles = [m["role"] for m in conv["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert conv["messages"][2]["tool_calls"] == [{"name": "f", "arguments": {"x": 1}}]
    assert conv["tools"][0]["function"]["name"] == "f"


@pytest.mark.parametrize(
    "value, field, reason",
    [
        ('{"name": "f", "arguments": "{x"}', "conversations[1].value[0].arguments", "JSON"),
        ('{"name": "g", "arguments": {}}', "conversations[1].value[0]", "not among the tools"),
        ("call f", "conversations[1].value", "must be JSON"),
    ],
)
def test_malformed_tool_calls_name_the_turn(value, field, reason):
    row = {
        "tools": '[{"name": "f"}]',
        "conversations": [
            {"from": "human", "value": "u"},
            {"from": "function_call", "value": value},
        ],
    }
    with pytest.raises(RowError) as err:
        get_map_fn("sharegpt")(row)
    assert err.value.field == field and reason in err.value.reason


def test_openai_tool_calls_and_tools():
    row = {
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "messages": [
            {"role": "user", "content": "u"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "1", "content": "4"},
            {"role": "assistant", "content": "4"},
        ],
    }
    messages, tools = validate_conversation(get_map_fn("openai")(row))
    assert messages[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"name": "f", "arguments": {}}],
    }
    assert tools[0]["function"]["name"] == "f"
    row["messages"][1]["tool_calls"][0]["function"]["name"] = "g"
    with pytest.raises(RowError) as err:
        get_map_fn("openai")(row)
    assert err.value.field == "messages[1].tool_calls[0]"


def test_pretrain_is_one_text_message():
    assert get_map_fn("pretrain")({"text": "hello"}) == {
        "messages": [{"role": "text", "content": "hello"}]
    }


@pytest.mark.parametrize(
    "name, row, field",
    [
        ("alpaca", {"instruction": "x"}, "output"),
        ("alpaca", {"instruction": 3, "output": "y"}, "instruction"),
        ("alpaca", ["not", "a", "dict"], None),
        ("openai", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ("openai", {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ("sharegpt", {"conversations": [{"from": "alien", "value": "x"}]}, "conversations[0].from"),
        ("history", {"instruction": "q", "output": "a", "history": [["only one"]]}, "history"),
        ("pretrain", {"txt": "x"}, "text"),
    ],
)
def test_bad_rows_name_the_field(name, row, field):
    with pytest.raises(RowError) as err:
        get_map_fn(name)(row)
    assert err.value.field == field


def test_conversation_without_assistant_is_rejected():
    with pytest.raises(RowError, match="no assistant turn"):
        validate_conversation({"messages": [{"role": "user", "content": "x"}]})


def test_unknown_map_fn_suggests():
    with pytest.raises(XtunerError, match="did you mean 'alpaca'"):
        get_map_fn("alpacca")
