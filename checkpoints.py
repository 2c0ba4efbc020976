"""The one checkpoint reader/writer, where checkpoints come from, and a training run's checkpoints
(CheckpointKeeper: save, prune, the newest good one, failed writes).

A checkpoint is `ckpts/{step}.pt`, a dict with `model`, `ema_model`, `optimizer`, `finished_steps`,
`finished_epochs` (the reference layout) and, from this implementation, `rng_states` (one per rank) so
that a resumed run continues bit-exactly, `dataset` (what it was trained on) and `config` (the run's every key,
config.yaml's and config.soflow.yaml's: inference.py and sample.py read it, so a checkpoint copied alone samples). Files are written atomically (temporary file, fsync, rename)
and read with `torch.load(weights_only=True)`.

Sampling also reads `.safetensors` files (the EMA weights alone, as `inference.py --export` writes them) and
checkpoints on the Hugging Face Hub, named `hf://ORG/REPO[@REVISION]/PATH` and fetched into the Hub's cache by
`huggingface_hub` (offline mode, HF_HUB_OFFLINE=1, reads the cache only). `config_beside` finds the config
that belongs to a checkpoint (and the companion file of this code's keys beside it).
"""
import os
import pickle
import posixpath
import re
import warnings
from dataclasses import dataclass
from urllib.parse import unquote

import torch

from distributed import first_error
from safe_io import OutputError, atomic_write

_NAME = re.compile(r"^(\d+)\.pt$")
HUB_PREFIX = "hf://"
# hf://[models/|datasets/|spaces/]ORG/REPO[@REVISION]/PATH, huggingface_hub's URI grammar (a revision holding
# a slash is a pull-request or conversion ref, or written URL-encoded: refs%2Fpr%2F1).
_HUB_URI = re.compile(r"^(?:(models|datasets|spaces)/)?([^/@]+/[^/@]+)"
                      r"(?:@(refs/(?:pr/\d+|convert/[\w.-]+)|[^/]+))?/(.+)$")
CONFIG_NAME = "config.yaml"


def companion_path(path):
    """The file beside a config this code writes that holds the keys the release does not know
    (config.save_config): DIR/NAME.yaml -> DIR/NAME.soflow.yaml."""
    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}.soflow{ext or '.yaml'}"


class CheckpointSourceError(ValueError):
    """A checkpoint (or its config) that cannot be found or fetched; the message names it and the fix."""


def save_checkpoint(state, path, before_rename=None):
    """Atomic write: a crash leaves either the previous file or the complete new one under `path`; a failure
    raises safe_io.WriteError naming the file and the free space. `before_rename(tmp_path)` is a hook for crash
    tests."""
    atomic_write(path, lambda tmp: torch.save(state, tmp), "checkpoint", before_rename)


def save_weights(weights, path, metadata=None):
    """Writes a state dict as a `.safetensors` file, atomically (contiguous CPU copies; `metadata` values are
    stored as strings)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}  # no shared storage

    def write(tmp):
        save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file private; give it the usual permissions
    atomic_write(path, write, "weights file")


def load_checkpoint(path, map_location="cpu"):
    """Reads a checkpoint (this code's or the reference release's), or a `.safetensors` file of weights, which
    comes back as {"ema_model": weights} (and "finished_steps" when its metadata has it). Raises ValueError
    naming the file."""
    if str(path).endswith(".safetensors"):
        return _load_weights(path, map_location)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be truncated or "
                             f"corrupt") from e
        first = str(e).strip().splitlines()[0]
        raise ValueError(f"checkpoint {path} is unsafe or not a weights-only checkpoint: it holds objects other than "
                         f"tensors, numbers and containers, and torch.load(weights_only=True) refused to run them "
                         f"({first}). Not loaded; use a checkpoint written by this code or the release") from e
    except Exception as e:  # truncated zip, bad archive, ...
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it may be truncated") from e
    if not isinstance(state, dict) or "ema_model" not in state and "model" not in state:
        raise ValueError(f"checkpoint {path} has no 'model' or 'ema_model' entry; is it a SoFlow checkpoint?")
    return state


def _load_weights(path, map_location):
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with safe_open(path, framework="pt", device=str(torch.device(map_location))) as f:
            weights = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
    except Exception as e:  # truncated file, bad header, ...
        raise ValueError(f"checkpoint {path} cannot be read as safetensors ({type(e).__name__}: {e}); it may be "
                         f"truncated") from e
    state = {"ema_model": weights}
    if str(metadata.get("finished_steps", "")).isdigit():
        state["finished_steps"] = int(metadata["finished_steps"])
    return state


def list_checkpoints(directory):
    """[(step, path)] sorted by step, newest last; names are parsed as integers, other files ignored."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), os.path.join(directory, name)))
    return sorted(found)


def latest_checkpoint(directory, log=print):
    """The newest checkpoint that loads, as (path, state), or (None, None). Unreadable ones are skipped
    with a warning."""
    for step, path in reversed(list_checkpoints(directory)):
        try:
            return path, load_checkpoint(path)
        except ValueError as e:
            warnings.warn(f"skipping {e}")
            log(f"warning: skipping {path}: {e}")
    return None, None


def prune_checkpoints(directory, keep_last, keep_every, newest):
    """Deletes periodic checkpoints beyond the newest `keep_last`, except those whose step is divisible by
    `keep_every`, and never `newest` (the one just written, already durable). Returns the deleted paths."""
    if not keep_last:
        return []
    found = [(step, path) for step, path in list_checkpoints(directory) if path != newest]
    removable = [(step, path) for step, path in found if not (keep_every and step % keep_every == 0)]
    doomed = removable[:max(len(removable) - (keep_last - 1), 0)]
    for _, path in doomed:
        os.remove(path)
    return [path for _, path in doomed]


class CheckpointWriteError(OutputError):
    """A checkpoint that could not be written; the message names it, the free space and the newest intact one."""


class CheckpointKeeper:
    """The checkpoints of a training run, `directory/{step}.pt`: written by rank 0 (atomically), pruned to
    `keep_last` / `keep_every` (prune_checkpoints), and the newest good one (`newest`, a path or None) remembered.
    `save` is a collective: a failed write (any exception type: torch.save raises RuntimeError on a full or
    read-only disk) stops every rank at once with CheckpointWriteError, instead of the others waiting in the next
    collective until the process group's timeout. `before_rename(step)` is a test hook (distributed.FaultInjection)."""

    def __init__(self, directory, rank, newest=None, keep_last=0, keep_every=0, log=print, before_rename=None):
        self.directory, self.rank, self.newest = directory, rank, newest
        self.keep_last, self.keep_every, self.log, self.before_rename = keep_last, keep_every, log, before_rename

    def path(self, step):
        return os.path.join(self.directory, f"{step}.pt")

    def save(self, step, state):
        """Writes `state` (a checkpoint dict, read on rank 0 only) as the checkpoint of `step`."""
        path, error = self.path(step), None
        if self.rank == 0:
            hook = (lambda tmp: self.before_rename(step)) if self.before_rename else None
            try:
                save_checkpoint(state, path, before_rename=hook)
            except Exception as e:  # any type, see above
                reason = str(e) if isinstance(e, OutputError) else (f"could not write checkpoint {path} "
                                                                     f"({type(e).__name__}: {e})")
                error = (f"{reason}. Earlier checkpoints are intact (newest: {self.newest or 'none'}); free space "
                         f"or fix the permissions, then re-run the same command to resume")
            else:
                self.log(f"saved checkpoint {path}")
                for old in prune_checkpoints(self.directory, self.keep_last, self.keep_every, path):
                    self.log(f"removed {old} (ckpt_keep_last={self.keep_last})")
        error = first_error(error)
        if error:
            raise CheckpointWriteError(error)
        self.newest = path


def model_state(state, use_ema=True):
    """The weights to sample with: the EMA weights when present."""
    key = "ema_model" if use_ema and "ema_model" in state else "model"
    return state[key]


# ----------------------------------------------------------------------------------------------------
# Sources: local files and the Hugging Face Hub


@dataclass(frozen=True)
class HubFile:
    repo_type: str   # model, dataset or space
    repo_id: str     # ORG/REPO
    revision: str    # None: the default branch
    path: str        # inside the repository

    def uri(self, path=None):
        kind = "" if self.repo_type == "model" else f"{self.repo_type}s/"
        return f"{HUB_PREFIX}{kind}{self.repo_id}{'@' + self.revision if self.revision else ''}/{path or self.path}"


def is_hub(spec):
    return str(spec).startswith(HUB_PREFIX)


def parse_hub(spec):
    """`hf://[models/|datasets/|spaces/]ORG/REPO[@REVISION]/PATH` -> HubFile."""
    match = _HUB_URI.match(str(spec)[len(HUB_PREFIX):]) if is_hub(spec) else None
    if match is None or match.group(4).endswith("/"):
        raise CheckpointSourceError(f"{spec!r} is not a Hub file: write hf://ORG/REPO/PATH or "
                                    f"hf://ORG/REPO@REVISION/PATH (e.g. hf://my-org/soflow-digits/model.safetensors)")
    kind, repo_id, revision, path = match.groups()
    if any(part in ("", ".", "..") for part in path.split("/")) or "\\" in path:
        raise CheckpointSourceError(f"{spec!r}: the path {path!r} is refused: it must name a file inside the "
                                    f"repository, without '.', '..' or empty segments or backslashes")
    return HubFile(kind[:-1] if kind else "model", repo_id, unquote(revision) if revision else None, path)


def hub_offline():
    """Whether Hugging Face offline mode is on (HF_HUB_OFFLINE, or TRANSFORMERS_OFFLINE), read now."""
    from_env = any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE")
                   for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if from_env:
        return True
    from huggingface_hub import constants
    return bool(constants.HF_HUB_OFFLINE)


def _fetch(ref, cache_dir=None):
    """The local path of a Hub file, from the Hub's cache or downloaded into it (never in offline mode)."""
    from huggingface_hub import constants, hf_hub_download

    offline = hub_offline()
    try:
        return hf_hub_download(ref.repo_id, ref.path, repo_type=ref.repo_type, revision=ref.revision,
                               cache_dir=cache_dir, local_files_only=offline)
    except Exception as e:  # not cached, no such repository / file / revision, no network, ...
        revision = ref.revision or "main"
        where = f"{ref.path} of the Hub {ref.repo_type} repository {ref.repo_id} (revision {revision})"
        get = (f"hf download {ref.repo_id} {ref.path}" + (f" --revision {revision}" if ref.revision else "")
               + ("" if ref.repo_type == "model" else f" --repo-type {ref.repo_type}"))
        if offline:
            raise CheckpointSourceError(
                f"{ref.uri()}: {where} is not in the Hugging Face cache {cache_dir or constants.HF_HUB_CACHE} and "
                f"offline mode is on (HF_HUB_OFFLINE=1), so nothing is downloaded. Fix: run `{get}` where there "
                f"is network (with the same HF_HOME / HF_HUB_CACHE, or copy the cache here), or unset "
                f"HF_HUB_OFFLINE to download it, or pass the file's local path") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointSourceError(
            f"{ref.uri()}: could not get {where} ({type(e).__name__}: {first}). Fix: check the repository, "
            f"revision and path (`hf auth login` for a private or gated repository), or pass a local file; "
            f"HF_HUB_OFFLINE=1 reads the cache only") from None


def resolve_checkpoint(spec, cache_dir=None):
    """The local path of a checkpoint given as a local path (returned unchanged) or as
    `hf://ORG/REPO[@REVISION]/PATH` (fetched through the Hub's cache; `cache_dir` overrides HF_HUB_CACHE)."""
    if not is_hub(spec):
        return spec
    return _fetch(parse_hub(spec), cache_dir)


def _config_candidates(path, join, dirname, basename):
    """The config's places for a checkpoint at `path`: its folder, then the run folder of `RUN/ckpts/N.pt`."""
    folder = dirname(path)
    places = [join(folder, CONFIG_NAME)]
    if basename(folder) == "ckpts":
        places.append(join(dirname(folder), CONFIG_NAME))
    return places


def config_beside(spec, cache_dir=None):
    """The config.yaml that belongs to a checkpoint: `config.yaml` in its folder (an exported folder), else the
    run's `config.yaml` for `RUN/ckpts/N.pt` (as train.py lays a run out); for `hf://ORG/REPO/PATH` the same
    places in the repository, fetched like the checkpoint, with its companion file (companion_path) when the
    repository has one (the release's hold config.yaml alone; load_config reports a companion that config.yaml
    names and that is missing). Raises CheckpointSourceError when there is no config."""
    if not is_hub(spec):
        places = _config_candidates(os.path.abspath(spec), os.path.join, os.path.dirname, os.path.basename)
        for place in places:
            if os.path.isfile(place):
                return place
        raise CheckpointSourceError(f"no --config given and no {CONFIG_NAME} beside the checkpoint {spec} (looked "
                                    f"for {' and '.join(places)}); pass --config CONFIG.yaml")
    ref = parse_hub(spec)
    places = _config_candidates(ref.path, posixpath.join, posixpath.dirname, posixpath.basename)
    errors = []
    for place in places:
        try:
            path = _fetch(HubFile(ref.repo_type, ref.repo_id, ref.revision, place.lstrip("/")), cache_dir)
        except CheckpointSourceError as e:
            errors.append(str(e))
            continue
        try:  # into the cache's snapshot folder, beside config.yaml, where load_config looks for it
            _fetch(HubFile(ref.repo_type, ref.repo_id, ref.revision, companion_path(place).lstrip("/")), cache_dir)
        except CheckpointSourceError:
            pass
        return path
    raise CheckpointSourceError(f"no --config given and no {CONFIG_NAME} beside {spec} could be read (looked for "
                                f"{' and '.join(ref.uri(p.lstrip('/')) for p in places)}); pass --config "
                                f"CONFIG.yaml. {errors[0]}")


# ----------------------------------------------------------------------------------------------------
# Does a checkpoint fit the model of a config?


def architecture(weights):
    """The sizes a state dict's shapes reveal: for a DiT the hidden size, patch, depth, input channels and label
    rows; for the U-Net its model channels, levels, blocks per level and embedding width."""
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    sizes = {}
    if "network.x_embedder.proj.weight" in shapes:
        hidden, channels, patch, _ = shapes["network.x_embedder.proj.weight"]
        sizes.update(backbone="DiT", hidden=hidden, patch=patch, channels=channels,
                     depth=len({k.split(".")[2] for k in shapes if k.startswith("network.blocks.")}))
        if "network.y_embedder.embedding_table.weight" in shapes:
            sizes["label rows"] = shapes["network.y_embedder.embedding_table.weight"][0]
    convs = sorted(k for k in shapes if re.fullmatch(r"network\.enc\.\d+x\d+_conv\.weight", k))
    if convs:
        blocks = {k.split(".")[2] for k in shapes if re.match(r"network\.enc\.\d+x\d+_block\d+\.", k)}
        levels = {name.split("_")[0] for name in blocks}
        sizes.update(backbone="UNet", model_channels=shapes[convs[-1]][0], channels=shapes[convs[-1]][1],
                     levels=len(levels), blocks=len(blocks) // max(len(levels), 1))
        if "network.map_layer0.weight" in shapes:
            sizes["embedding"] = shapes["network.map_layer0.weight"][0]
    return sizes


class CheckpointMismatchError(ValueError):
    """Weights that do not fit the config's model; the message says which sizes differ."""


def check_weights_fit(model, weights, described, source):
    """Raises CheckpointMismatchError, before any load_state_dict, when `weights` (a state dict read from `source`)
    do not have the keys and shapes of `model`; `described` names the config's model (e.g. its model_type).
    The message gives the sizes that differ, as the shapes reveal them."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or wrong):
        return
    ours, theirs = architecture(expected), architecture(weights)
    differ = [k for k in ours if ours[k] != theirs.get(k)]
    if "backbone" in differ:
        what = f"the config describes {described} (a {ours['backbone']}), the checkpoint a {theirs.get('backbone', 'model of unknown kind')}"
    elif differ:
        what = (f"the config describes {described} with " + ", ".join(f"{k} {ours[k]}" for k in differ)
                + ", the checkpoint " + ", ".join(f"{k} {theirs.get(k, 'none')}" for k in differ))
    else:
        shown = [f"{k} {tuple(weights[k].shape)} (the config's model: {tuple(expected[k].shape)})" for k in wrong[:3]]
        what = (f"the config describes {described}; the checkpoint's keys differ: " +
                "; ".join(filter(None, [f"{len(missing)} missing ({', '.join(missing[:3])})" if missing else "",
                                        f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])})" if unexpected else "",
                                        f"{len(wrong)} of other shapes: {', '.join(shown)}" if wrong else ""])))
    raise CheckpointMismatchError(f"checkpoint {source} does not fit the config: {what}. Pass the config it was "
                                  f"trained with (the config.yaml of its run), or a checkpoint of this config")
