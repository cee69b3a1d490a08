import json

import pytest

from transfertune.io.data import IGNORE_INDEX, DataFormatError, encode_example, read_jsonl


def write(tmp_path, lines):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_three_forms_are_read(tmp_path):
    p = write(tmp_path, [
        json.dumps({"prompt": "a", "response": "b"}),
        json.dumps({"prompt": "c", "completion": "Business<|endoftext|>"}),
        "",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}),
    ])
    recs = read_jsonl(p)
    assert recs[0] == {"prompt": "a", "response": "b"}
    assert recs[1] == {"prompt": "c", "response": "Business"}
    assert recs[2]["messages"][-1]["content"] == "yo"


@pytest.mark.parametrize("bad, message", [
    ('{"prompt": "a", "response": ', "line 2 is not valid JSON"),
    ('["a", "b"]', "line 2 is not a JSON object"),
    ('{"prompt": "a"}', "line 2: expected string fields"),
    ('{"messages": [{"role": "user", "content": "x"}]}', 'line 2: the last of "messages"'),
])
def test_malformed_lines_name_file_and_line(tmp_path, bad, message):
    p = write(tmp_path, [json.dumps({"prompt": "a", "response": "b"}), bad])
    with pytest.raises(DataFormatError) as err:
        read_jsonl(p)
    assert message in str(err.value) and str(p) in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataFormatError, match="not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match="no examples"):
        read_jsonl(tmp_path / "empty.jsonl")


def test_labels_cover_only_the_response_and_eos(tokenizer):
    ex = encode_example(tokenizer, {"prompt": "The cat sat", "response": " on the mat"})
    p = tokenizer("The cat sat")["input_ids"]
    r = tokenizer(" on the mat", add_special_tokens=False)["input_ids"]
    assert ex["input_ids"] == p + r + [tokenizer.eos_token_id]
    assert ex["labels"] == [IGNORE_INDEX] * len(p) + r + [tokenizer.eos_token_id]


def test_truncation_keeps_the_response(tokenizer):
    ex = encode_example(tokenizer, {"prompt": "The cat sat on the mat. " * 10, "response": " yes"}, max_length=12)
    assert len(ex["input_ids"]) == 12
    assert ex["input_ids"][-2:] == ex["labels"][-2:] and ex["labels"][0] == IGNORE_INDEX


def test_chat_without_template_uses_a_plain_format(tokenizer):
    ex = encode_example(tokenizer, {"messages": [{"role": "user", "content": "hi"},
                                                 {"role": "assistant", "content": "yo"}]})
    n_prompt = sum(1 for x in ex["labels"] if x == IGNORE_INDEX)
    assert tokenizer.decode(ex["input_ids"][:n_prompt]) == "user: hi\nassistant: "
