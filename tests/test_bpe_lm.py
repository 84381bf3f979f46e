"""BPE language models end to end: --tokenizer bpe/gpt2 through train_gpt.py and sample.py, bits per
character, padded vocabularies, streaming of split multi-byte characters, data/shakespeare/prepare.py."""

import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minigpt.corpus import build_tokenizer, model_vocab_size
from minigpt.gpt import GPT, GPTConfig
from minigpt.inference import load_model, sample_text
from minigpt.lm import RunConfig
from minigpt.tokenizers import BPETokenizer, CharTokenizer, StreamDecoder, padded_vocab_size

ROOT = Path(__file__).resolve().parents[1]
UNICODE_TEXT = "日本語のテキストです。 naïve café 😀🎉 Ωμέγα. 中文字符，漢字。 🚀 ok\n" * 40
STREAM_TOKENIZERS = {"bpe": BPETokenizer.train(UNICODE_TEXT, 290), "char": CharTokenizer.from_text(UNICODE_TEXT)}

sys.path.insert(0, str(ROOT / "scripts"))
import sample as sample_script  # noqa: E402
import train_gpt as train_script  # noqa: E402

SMALL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "16", "--batch-size", "4"]


def train_args(out_dir, data, *extra):
    return ["--data", str(data), "--out-dir", str(out_dir), "--eval-iters", "2", "--quiet", "--no-plot", *extra]


def evals(out_dir):
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["metrics"] for r in map(json.loads, lines) if "metrics" in r]


def expect_exit_2(capsys, main, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_bpe_train_then_sample_from_the_cli(tmp_path, text_file, capsys):
    out = tmp_path / "out"
    argv = ["--tokenizer", "bpe", "--vocab-size", "512", "--max-iters", "30", "--eval-interval", "15", *SMALL]
    train_script.main(train_args(out, text_file, *argv, "--sample-tokens", "10"))
    stdout = capsys.readouterr().out
    assert "bits/char" in stdout and "--- sample ---" in stdout
    model, tokenizer, meta = load_model(out / "ckpt.npz")
    assert tokenizer.kind == "bpe" and tokenizer.vocab_size == 512 and model.config.vocab_size == 512
    data_meta = json.loads((out / "data" / "meta.json").read_text())
    assert data_meta["dtype"] == "uint16" and data_meta["val_tokens"] < data_meta["val_chars"]  # merges happened
    first, last = evals(out)
    assert last["val_loss"] < first["val_loss"] < math.log(512) + 0.5

    sample_script.main(["--out-dir", str(out), "--start", "ROMEO:", "--max-new-tokens", "20", "--num-samples", "2"])
    stdout = capsys.readouterr().out
    assert stdout.count("ROMEO:") >= 2 and stdout.count("---------------") == 2


def test_val_bpc_is_val_loss_times_tokens_per_char(tmp_path, text_file):
    out = tmp_path / "out"
    argv = ["--tokenizer", "bpe", "--vocab-size", "300", "--max-iters", "4", "--eval-interval", "2"]
    train_script.main(train_args(out, text_file, *argv, *SMALL, "--sample-tokens", "0"))
    data_meta = json.loads((out / "data" / "meta.json").read_text())
    tokens_per_char = data_meta["val_tokens"] / data_meta["val_chars"]
    assert tokens_per_char < 1
    metrics = evals(out)
    assert len(metrics) == 2
    for m in metrics:
        assert m["val_bpc"] == pytest.approx(m["val_loss"] * tokens_per_char / math.log(2), rel=1e-9)


@pytest.mark.parametrize(
    "vocab_size,words",
    [("0", ">= 257"), ("100", ">= 257"), ("256", ">= 257"), ("5000", "more than this text supports")],
)
def test_bad_vocab_size_is_one_line_exit_2(tmp_path, capsys, vocab_size, words):
    small = tmp_path / "small.txt"
    small.write_text("the cat sat on the mat. " * 100)  # runs out of pairs after a few dozen merges
    argv = train_args(tmp_path / "out", small, "--tokenizer", "bpe", "--vocab-size", vocab_size, *SMALL)
    err = expect_exit_2(capsys, train_script.main, argv)
    assert words in err and "--vocab-size" in err


def test_smallest_bpe_vocab_is_bytes_plus_endoftext():
    tokenizer = build_tokenizer(RunConfig(tokenizer="bpe", vocab_size=257), "hello world")
    assert tokenizer.vocab_size == 257 and model_vocab_size(tokenizer) == 257


class PaddingLover:
    """Wraps a GPT so the padding ids (>= limit) get by far the largest logits."""

    def __init__(self, model, limit):
        self.model, self.limit, self.emitted = model, limit, []
        forward = model.forward

        def forward_preferring_padding(*args, **kwargs):
            logits, loss = forward(*args, **kwargs)
            logits.data[..., limit:] += 1e4
            return logits, loss

        model.forward = forward_preferring_padding  # instance attribute: Module.__call__ finds it

    def generate_tokens(self, *args, **kwargs):
        for ids in self.model.generate_tokens(*args, **kwargs):
            self.emitted.append(int(ids[0]))
            yield ids


def assert_never_samples_padding(model, tokenizer):
    assert model.config.vocab_size > tokenizer.vocab_size
    wrapped = PaddingLover(model, tokenizer.vocab_size)
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 0}, {"temperature": 2.0, "top_k": 50}):
        sample_text(wrapped, tokenizer, "\n", 12, **kwargs)
    assert len(wrapped.emitted) == 36 and max(wrapped.emitted) < tokenizer.vocab_size


def test_sampling_never_emits_a_padding_id():
    tokenizer = BPETokenizer.train(UNICODE_TEXT, 300)
    padded = padded_vocab_size(tokenizer.vocab_size)  # 320
    model = GPT(GPTConfig(vocab_size=padded, block_size=8, n_layer=1, n_head=2, n_embd=16))
    assert_never_samples_padding(model, tokenizer)


def test_gpt2_train_then_sample(tmp_path, text_file, tiktoken_cache, capsys):
    out = tmp_path / "out"
    tiny = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2"]
    argv = ["--tokenizer", "gpt2", "--max-iters", "3", "--eval-interval", "3", "--sample-tokens", "5", *tiny]
    train_script.main(train_args(out, text_file, *argv))
    assert "bits/char" in capsys.readouterr().out
    data_meta = json.loads((out / "data" / "meta.json").read_text())
    assert data_meta["vocab_size"] == 50257 and data_meta["dtype"] == "uint16"
    model, tokenizer, _ = load_model(out / "ckpt.npz")
    assert tokenizer.vocab_size == 50257 and model.config.vocab_size == 50304 == model_vocab_size(tokenizer)
    assert model.transformer.wte.weight.shape == (50304, 16)
    sample_script.main(["--out-dir", str(out), "--start", "Hello", "--max-new-tokens", "5"])
    assert capsys.readouterr().out.startswith("Hello")
    assert_never_samples_padding(model, tokenizer)


class Replay:
    """A stand-in model whose "generation" is a fixed list of ids, one per step."""

    def __init__(self, ids):
        self.ids = ids

    def generate_tokens(self, idx, max_new_tokens, **kwargs):
        for i in self.ids[:max_new_tokens]:
            yield np.array([i])


class Recorder(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, s):
        self.writes.append(s)
        return super().write(s)


def test_streaming_keeps_multibyte_characters_whole():
    tokenizer = BPETokenizer.train(UNICODE_TEXT, 290)  # few merges: many characters span several tokens
    target = "漢字 😀🎉🚀 naïve Ωμέγα 中文"
    ids = tokenizer.encode(target)

    def is_partial(i):
        try:
            tokenizer.ranks[i].decode("utf-8")
            return False
        except UnicodeDecodeError:
            return True

    assert sum(map(is_partial, ids)) >= 5  # the test means something: characters really are split
    stream = Recorder()
    text = sample_text(Replay(ids), tokenizer, "x", len(ids), stream=stream)
    assert text == target and "".join(stream.writes) == target
    assert all(w and "\ufffd" not in w for w in stream.writes)
    assert len(stream.writes) < len(ids)  # some tokens waited for the rest of their character


def test_streaming_flushes_broken_bytes_at_the_end():
    tokenizer = BPETokenizer.train(UNICODE_TEXT, 290)
    emoji = list("😀".encode())  # byte tokens 0..255 are their own ids
    ids = tokenizer.encode("a") + emoji[:2] + tokenizer.encode("b") + emoji[:3]  # two truncated characters
    stream = Recorder()
    text = sample_text(Replay(ids), tokenizer, "x", len(ids), stream=stream)
    assert text == tokenizer.decode(ids) and text.startswith("a\ufffdb") and text.endswith("\ufffd")
    assert "".join(stream.writes) == text  # nothing lost or repeated, even for invalid byte sequences


def test_streaming_decodes_each_id_once():
    tokenizer = BPETokenizer.train(UNICODE_TEXT, 290)
    ids = tokenizer.encode(UNICODE_TEXT)
    seen = []
    decode_bytes = tokenizer.decode_bytes
    tokenizer.decode_bytes = lambda chunk: seen.extend(chunk) or decode_bytes(chunk)
    text = sample_text(Replay(ids), tokenizer, "x", len(ids), stream=Recorder())
    assert text == UNICODE_TEXT and seen == ids  # constant work per token: no id is decoded twice


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 289), max_size=40), st.sampled_from(["bpe", "char"]))
def test_stream_decoder_pieces_equal_decode(ids, kind):
    tokenizer = STREAM_TOKENIZERS[kind]
    ids = [i % tokenizer.vocab_size for i in ids]
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.step([i]) for i in ids] + [decoder.finish()]
    assert "".join(pieces) == tokenizer.decode(ids)
    assert all("\ufffd" not in p for p in pieces[:-1]) or "\ufffd" in tokenizer.decode(ids)


def load_prepare_script():
    spec = importlib.util.spec_from_file_location("shakespeare_prepare", ROOT / "data" / "shakespeare" / "prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shakespeare_prepare_on_a_small_file(tmp_path, tiktoken_cache, capsys):
    data = tmp_path / "small.txt"
    data.write_text("Hello world\n" * 50)
    load_prepare_script().main(["--data", str(data), "--out-dir", str(tmp_path / "prepared")])
    assert "train has" in capsys.readouterr().out
    meta = json.loads((tmp_path / "prepared" / "meta.json").read_text())
    assert meta["tokenizer"] == {"kind": "tiktoken", "name": "gpt2"} and meta["dtype"] == "uint16"
    train = np.fromfile(tmp_path / "prepared" / "train.bin", dtype=np.uint16)
    assert len(train) == meta["train_tokens"] and train[:3].tolist() == [15496, 995, 198]  # "Hello world\n"
    assert meta["train_chars"] + meta["val_chars"] == len(data.read_text())
