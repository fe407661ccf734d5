"""The ``xllm`` config section: valid input parses, bad input names the key and what is allowed."""

from __future__ import annotations

import pytest

from xllm_plugin.config import XLLMConfigError, additional_config_from_argv, parse_xllm_config


def test_missing_section_gives_defaults() -> None:
    config = parse_xllm_config({"other_plugin": {"x": 1}})
    assert config.status_interval_ms == 250
    assert config.request_classes.default_class == "online"


def test_unknown_key_names_key_and_allowed_keys() -> None:
    with pytest.raises(XLLMConfigError) as error:
        parse_xllm_config({"xllm": {"bogus": 1}})
    message = str(error.value)
    assert "'xllm.bogus'" in message
    assert "request_classes" in message and "status_interval_ms" in message
    assert "\n" not in message


def test_unknown_nested_key_lists_that_sections_keys() -> None:
    with pytest.raises(XLLMConfigError, match=r"'xllm\.request_classes\.nope'.*default_class, "
                                              r"offline_min_priority"):
        parse_xllm_config({"xllm": {"request_classes": {"nope": True}}})


@pytest.mark.parametrize(("section", "key", "allowed"), [
    ({"status_interval_ms": 0}, "xllm.status_interval_ms", "int >= 1 and <= 60000"),
    ({"status_interval_ms": "fast"}, "xllm.status_interval_ms", "int >= 1 and <= 60000"),
    ({"request_classes": {"default_class": "batch"}}, "xllm.request_classes.default_class",
     'one of "online", "offline"'),
    ({"request_classes": 3}, "xllm.request_classes", "an object with keys"),
])
def test_bad_value_names_key_and_allowed_values(section: dict, key: str, allowed: str) -> None:
    with pytest.raises(XLLMConfigError) as error:
        parse_xllm_config({"xllm": section})
    assert f"'{key}'" in str(error.value)
    assert allowed in str(error.value)


def test_section_must_be_an_object() -> None:
    with pytest.raises(XLLMConfigError, match="must be a JSON object"):
        parse_xllm_config({"xllm": [1, 2]})


@pytest.mark.parametrize("argv", [
    ["serve", "m", "--additional-config", '{"xllm": {"status_interval_ms": 5}}'],
    ["serve", "m", '--additional-config={"xllm": {"status_interval_ms": 5}}'],
    ["serve", "m", "--additional_config", '{"xllm": {"status_interval_ms": 5}}'],
])
def test_additional_config_is_found_on_a_serve_command_line(argv: list[str]) -> None:
    assert parse_xllm_config(additional_config_from_argv(argv)).status_interval_ms == 5


def test_command_line_without_additional_config_is_fine() -> None:
    assert additional_config_from_argv(["serve", "m", "--port", "8000"]) is None


def test_invalid_json_on_command_line_is_reported() -> None:
    with pytest.raises(XLLMConfigError, match="not valid JSON"):
        additional_config_from_argv(["serve", "m", "--additional-config", "{xllm:"])
