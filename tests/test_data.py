import json

import pytest

from pocketrlhf.data.formats import Skipped, preference_pairs, prompts, sft_pairs
from pocketrlhf.data.loading import load_records
from pocketrlhf.data.templates import completion_text, prompt_text, render
from pocketrlhf.data.tokenize import TokenExample, collate, left_pad, pack, tokenize_pair, tokenize_sft
from pocketrlhf.errors import DataError
from pocketrlhf.models.loading import load_tokenizer

ROWS = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(12)]


@pytest.fixture(scope="module")
def tok(llama):
    return load_tokenizer(str(llama))


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet", "csv", "arrow", "save_to_disk"])
def test_loads_every_file_type(tmp_path, suffix):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif suffix == "json":
        path.write_text(json.dumps(ROWS))
    elif suffix == "parquet":
        ds.to_parquet(str(path))
    elif suffix == "csv":
        ds.to_csv(str(path), index=False)
    elif suffix == "arrow":
        path = tmp_path / "folder"
        ds.save_to_disk(str(path))
        path = next(path.glob("*.arrow"))
    else:
        path = tmp_path / "saved"
        ds.save_to_disk(str(path))
    loaded = load_records(path)
    assert len(loaded) == 12 and loaded[3]["completion"] == "answer 3"


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: malformed JSON line"):
        load_records(path)
    path.write_text('{"text": "ok"}\n["a list"]\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a JSON object"):
        load_records(path)


def test_empty_missing_and_unsupported(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_records(empty)
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "nope.jsonl")
    other = tmp_path / "data.txt"
    other.write_text("x")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_records(other)


def test_missing_columns_and_wrong_types(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"foo": "a", "bar": "b"}])
    with pytest.raises(DataError, match=r"src: no usable columns for SFT data: expected .*text.*; found foo, bar"):
        sft_pairs(ds, "src")
    ds = datasets.Dataset.from_list([{"prompt": "p", "completion": 3}, {"prompt": "p", "completion": 4}])
    with pytest.raises(DataError, match=r"src: row 1: column 'completion' must be a string, got int"):
        sft_pairs(ds, "src")


def test_a_column_changing_type_names_the_line(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"prompt": "p", "completion": "c"}\n{"prompt": "p", "completion": ["x"]}\n')
    with pytest.raises(DataError, match=r"mixed.jsonl:2: column 'completion' is a list here but a string at .*:1"):
        load_records(path)


def test_empty_rows_are_counted_not_dropped_silently():
    import datasets

    ds = datasets.Dataset.from_list([{"text": "hello"}, {"text": ""}, {"text": None}, {"text": "bye"}])
    pairs, skipped = sft_pairs(ds, "src")
    assert [p.completion for p in pairs] == ["hello", "bye"]
    assert skipped.total == 2 and "empty text" in skipped.describe()


def test_stackllama_template_is_exact():
    assert prompt_text("How?", "stackllama") + completion_text("Like this.", "stackllama") == \
        "Question: How?\n\nAnswer: Like this."
    import datasets

    ds = datasets.Dataset.from_list([{"question": "How?", "response_j": "Like this.", "response_k": "No."}])
    (pair,), _ = sft_pairs(ds, "se")
    assert (pair.prompt, pair.completion) == ("Question: How?\n\nAnswer: ", "Like this.")
    (pref,), _ = preference_pairs(ds, "se")
    assert (pref.prompt, pref.chosen, pref.rejected) == ("Question: How?\n\nAnswer: ", "Like this.", "No.")
    (prompt,), _ = prompts(ds, "se")
    assert prompt == "Question: How?\n\nAnswer: "


def test_messages_use_chat_template_or_chatml(tok):
    import datasets

    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ds = datasets.Dataset.from_list([{"messages": msgs}])
    (pair,), _ = sft_pairs(ds, "chat", tokenizer=tok)  # tiny tokenizer has no chat template: ChatML
    assert pair.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert pair.completion == "hello<|im_end|>"
    tok2 = type(tok).from_pretrained(tok.name_or_path)
    tok2.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}" \
                         "{% if add_generation_prompt %}[assistant] {% endif %}"
    (pair,), _ = sft_pairs(ds, "chat", tokenizer=tok2)
    assert (pair.prompt, pair.completion) == ("[user] hi\n[assistant] ", "hello")


def test_implicit_prompt_is_the_common_prefix():
    import datasets

    ds = datasets.Dataset.from_list([{"chosen": "Q: what is it? A: a dog", "rejected": "Q: what is it? A: the cat"}])
    (pair,), _ = preference_pairs(ds, "p")
    assert pair.prompt == "Q: what is it? A: "
    assert (pair.chosen, pair.rejected) == ("a dog", "the cat")


def test_every_completion_ends_with_eos_and_completion_only_masks_prompt(tok):
    ex = tokenize_pair(tok, "Write a review.", " great fun .", completion_only=True)
    assert ex.input_ids[-1] == tok.eos_token_id
    n_prompt = len(tok("Write a review.")["input_ids"])
    assert ex.loss_mask[:n_prompt] == [0] * n_prompt and all(ex.loss_mask[n_prompt:])
    full = tokenize_pair(tok, "Write a review.", " great fun .", completion_only=False)
    assert all(full.loss_mask)
    assert tok.pad_token_id != tok.eos_token_id


def test_packing_joins_with_eos_cuts_constant_chunks_and_drops_the_tail():
    examples = [TokenExample([i] * 3 + [99], [1] * 4) for i in range(10)]  # 40 tokens, EOS=99
    chunks = pack(examples, seq_length=12, seed=0)
    assert len(chunks) == 3 and all(len(c.input_ids) == 12 for c in chunks)
    flat = [t for c in chunks for t in c.input_ids]
    assert flat.count(99) == 9  # 36 of 40 tokens kept: the incomplete tail is dropped
    assert pack(examples, 12, seed=0)[0].input_ids == chunks[0].input_ids  # deterministic
    with pytest.raises(DataError, match="not enough tokens"):
        pack(examples[:1], seq_length=12, seed=0)


def test_truncation_is_reported(tok):
    from pocketrlhf.data.formats import TextPair

    skipped = Skipped()
    out = tokenize_sft(tok, [TextPair("", "word " * 50)], False, max_length=8, skipped=skipped)
    assert len(out[0].input_ids) == 8 and "truncated" in skipped.describe()


def test_padding_sides():
    batch = collate([TokenExample([1, 2, 3], [0, 1, 1]), TokenExample([4], [1])], pad_id=7)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]  # right padding for training
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, attn = left_pad([[1, 2, 3], [4]], pad_id=7)  # left padding for generation
    assert ids.tolist() == [[1, 2, 3], [7, 7, 4]] and attn.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_chat_formats_render_what_training_appends():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for fmt in ("stackllama", "chatml", "vicuna", "llama-2"):
        head = render(msgs[:1], fmt, add_generation_prompt=True)
        assert render(msgs, fmt).startswith(head + completion_text("a", fmt).rstrip()) or \
            (head + completion_text("a", fmt)).startswith(render(msgs, fmt).rstrip())


def test_preference_tokenization_and_batch_layout(tok):
    from pocketrlhf.data.formats import PreferencePair
    from pocketrlhf.data.tokenize import collate_preferences, tokenize_preferences

    skipped = Skipped()
    pairs = [PreferencePair("Write a review.", " great fun .", " a dull ending ."),
             PreferencePair("Write " * 40, " ok .", " bad ."),
             PreferencePair("p", " word" * 40, " bad .")]
    out = tokenize_preferences(tok, pairs, max_length=24, skipped=skipped)
    assert len(out) == 2 and skipped.counts["pairs with an answer longer than max_length"] == 1
    assert len(out[1].prompt_ids) + len(out[1].chosen_ids) <= 24  # prompt cut from the left
    assert all(e.chosen_ids[-1] == tok.eos_token_id and e.rejected_ids[-1] == tok.eos_token_id for e in out)
    batch = collate_preferences(out, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 4  # chosen rows, then rejected rows
    n_prompt = len(out[0].prompt_ids)
    assert batch["response_mask"][0, :n_prompt].sum() == 0
    assert batch["response_mask"][0].sum() == len(out[0].chosen_ids)
    assert batch["response_mask"][2].sum() == len(out[0].rejected_ids)


def test_text_that_already_starts_with_bos_gets_no_second_bos(tok):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    from pocketrlhf.data.tokenize import encode

    bos_tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    bos_tok.bos_token = "<|im_start|>"
    bos_id = bos_tok.convert_tokens_to_ids("<|im_start|>")
    bos_tok._tokenizer.post_processor = TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos_id)])
    assert encode(bos_tok, "hello", special=True)[0] == bos_id
    ids = encode(bos_tok, "<|im_start|>hello", special=True)
    assert ids[0] == bos_id and ids.count(bos_id) == 1


def test_effective_template_is_what_rows_are_rendered_with():
    from pocketrlhf.data.formats import effective_template

    assert effective_template("messages", "plain") == "auto"
    assert effective_template("stackexchange", "plain") == "stackllama"
    assert effective_template("prompt_completion", "plain") == "plain"
    assert effective_template("messages", "chatml") == "chatml"
