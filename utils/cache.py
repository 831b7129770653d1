"""One download cache for weights and reference statistics.

Sources understood by :func:`fetch`:

* a local path (``/data/net.pkl``, ``file:///data/net.pkl``) -- returned as is;
* an ``http(s)://`` URL -- cached at ``cache_dir()/<host>/<url path>``;
* ``hf://<org>/<repo>/<filename>`` -- one file of a Hugging Face Hub model
  repository, cached at ``cache_dir()/hf/<org>/<repo>/<filename>``.

Downloads go to a temporary file beside the target and are renamed when
complete, so an interrupted download never looks finished.  When the sha256 of
a file is known it is checked; the digest of every download is recorded beside
it in ``<file>.sha256``.  Under torchrun rank 0 downloads while the other ranks
wait on a barrier.  When a file is missing and cannot be downloaded, an
:class:`OfflineError` names the URL and the exact path to place the file at,
so compute nodes without internet can be served by copying files into the
cache.  The message's last advice (:data:`OFFLINE_FIX`: run the command once where
there is internet, with the same ``$SWG_CACHE``) holds for any command; a command
line with a better remedy gives its own with :meth:`OfflineError.advise` (the
samplers' ``--prefetch``, :func:`utils.cli.offline_advice`; ``python -m metrics``
names its ``--*_weights`` and ``--ref``).
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Iterable, Optional

from utils import dist
from utils.errors import UsageError

__all__ = ["OfflineError", "cache_dir", "cache_path", "is_remote", "fetch", "hf_snapshot", "prefetch"]

_CHUNK = 1 << 20
_SNAPSHOT_PATTERNS = ["*.json", "*.safetensors"]


# The last advice of an OfflineError, true for every command; a command line with a better remedy gives its
# own with OfflineError.advise (the samplers' --prefetch: utils.cli.PREFETCH_FIX; metrics' --*_weights FILE).
OFFLINE_FIX = "or run this command once on a machine with internet, with the same $SWG_CACHE"


class OfflineError(UsageError):
    """A file is not cached and cannot be downloaded (offline or unreachable).

    Made by :func:`_offline`: ``problem`` (what could not be downloaded, from where, why), ``target``
    (where a copy placed by hand is found) and ``fix`` (a further remedy, by default :data:`OFFLINE_FIX`,
    which any command can follow).  An error made from a plain message has only that message.
    """

    def __init__(self, message: str, *, problem: Optional[str] = None, target: Optional[pathlib.Path] = None,
                 fix: Optional[str] = None):
        super().__init__(message)
        self.problem, self.target, self.fix = problem, target, fix

    def advise(self, fix: str) -> "OfflineError":
        """The same error with another last advice ``fix`` (a command's own remedy, e.g. its ``--prefetch``)."""
        if self.problem is None or self.target is None:
            return self
        return _offline_error(self.problem, self.target, fix)


def cache_dir() -> pathlib.Path:
    """The cache root: ``$SWG_CACHE`` when set, else ``~/.cache/swg``."""
    root = os.environ.get("SWG_CACHE") or os.path.join("~", ".cache", "swg")
    return pathlib.Path(root).expanduser()


def is_remote(source: str) -> bool:
    """True for sources that :func:`fetch` downloads (``http(s)://`` and ``hf://``)."""
    return bool(re.match(r"^(https?|hf)://", str(source)))


def _split_hf(source: str) -> tuple[str, str]:
    rest = source[len("hf://"):]
    parts = rest.split("/")
    if len(parts) < 3 or not all(parts):
        raise UsageError(f"malformed Hugging Face source {source!r}; write hf://<org>/<repo>/<filename>")
    return "/".join(parts[:2]), "/".join(parts[2:])


def cache_path(source: str) -> pathlib.Path:
    """Where :func:`fetch` keeps ``source`` (a URL or ``hf://`` address) in the cache."""
    if source.startswith("hf://"):
        repo_id, filename = _split_hf(source)
        return cache_dir() / "hf" / repo_id / filename
    url = urllib.parse.urlsplit(source)
    parts = [p for p in urllib.parse.unquote(url.path).split("/") if p not in ("", ".", "..")]
    if not url.hostname or not parts:
        raise UsageError(f"malformed URL {source!r}; give a full http(s) address of a file")
    return cache_dir().joinpath(url.hostname, *parts)


def _sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _record_path(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def _verify_cached(path: pathlib.Path, sha256: Optional[str], record_digest: bool = True) -> None:
    """Check a file against a known digest (for cached files computed once, then read from the record)."""
    if sha256 is None:
        return
    record = _record_path(path)
    actual = record.read_text().strip() if record_digest and record.is_file() else None
    if actual is None or actual != sha256.lower():
        actual = _sha256_file(path)
        if record_digest:
            _atomic_write_text(record, actual + "\n")
    if actual != sha256.lower():
        raise UsageError(f"cached file {path} has sha256 {actual}, expected {sha256}; "
                         f"delete it (and {record.name}) so it is downloaded again")


def _atomic_write_text(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _offline_error(problem: str, target: pathlib.Path, fix: str) -> OfflineError:
    return OfflineError(f"{problem}; if this machine is offline, download it elsewhere and place it at {target} "
                        f"({fix})", problem=problem, target=target, fix=fix)


def _offline(source: str, target: pathlib.Path, what: str, reason: object) -> OfflineError:
    reason = " ".join(str(reason).split()) or type(reason).__name__
    return _offline_error(f"cannot download {what} from {source} ({reason})", target, OFFLINE_FIX)


def _download_url(url: str, target: pathlib.Path, sha256: Optional[str], desc: str) -> None:
    """Stream ``url`` into a temporary file beside ``target``, check, then rename."""
    from tqdm.auto import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part{os.getpid()}")
    digest = hashlib.sha256()
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "swg-toolkit"})
        with urllib.request.urlopen(request, timeout=60) as response, open(tmp, "wb") as f:
            total = response.headers.get("Content-Length")
            with tqdm(total=int(total) if total else None, unit="B", unit_scale=True, desc=desc,
                      disable=None, leave=False) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
            if total is not None and f.tell() != int(total):
                raise OSError(f"connection closed after {f.tell()} of {total} bytes")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        tmp.unlink(missing_ok=True)
        raise _offline(url, target, desc, getattr(exc, "reason", exc)) from exc
    actual = digest.hexdigest()
    if sha256 is not None and actual != sha256.lower():
        tmp.unlink(missing_ok=True)
        raise UsageError(f"download of {url} has sha256 {actual}, expected {sha256}; the file was "
                         f"discarded; check the address or place a correct copy at {target}")
    os.replace(tmp, target)
    _atomic_write_text(_record_path(target), actual + "\n")


def _probe(url: str, timeout: float) -> None:
    """Open and close a TCP connection to ``url``'s host (or its proxy); ``OSError`` when unreachable."""
    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((parts.hostname, port), timeout=timeout):
        pass


def _check_hub_reachable(url: str, target: pathlib.Path, desc: str) -> None:
    """Fail within seconds on a node that cannot reach the Hub.

    Without ``HF_HUB_OFFLINE``, ``huggingface_hub`` retries an unreachable Hub
    with back-off for about a minute per file before giving up; one short
    connection attempt (``$SWG_CONNECT_TIMEOUT`` seconds, default 5) decides first.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return  # huggingface_hub itself fails at once
    try:
        _probe(constants.ENDPOINT, float(os.environ.get("SWG_CONNECT_TIMEOUT") or 5))
    except (OSError, ValueError) as exc:
        raise _offline(url, target, desc, f"cannot connect to {constants.ENDPOINT}: {exc}") from exc


def _download_hf(source: str, target: pathlib.Path, desc: str) -> None:
    import huggingface_hub

    repo_id, filename = _split_hf(source)
    local_dir = cache_dir() / "hf" / repo_id
    url = f"https://huggingface.co/{repo_id}/resolve/main/{filename}"
    _check_hub_reachable(url, target, desc)
    try:
        path = huggingface_hub.hf_hub_download(repo_id, filename, local_dir=str(local_dir))
    except Exception as exc:  # network, auth and missing-file errors all come through here
        raise _offline(url, target, desc, exc) from exc
    path = pathlib.Path(path)
    if path.resolve() != target.resolve():
        shutil.copyfile(path, target)
    _atomic_write_text(_record_path(target), _sha256_file(target) + "\n")


def _rank0_first(work: Callable[[], None], done: Callable[[], bool], fail: Callable[[], Exception]) -> None:
    """Run ``work`` on rank 0 while the other ranks wait, then check ``done`` everywhere.

    On a multi-node run whose cache is not shared between nodes (``$SWG_CACHE`` on a
    node-local disk), the other nodes still miss the file after rank 0's download; the
    first process of each such node (``LOCAL_RANK`` 0) then fetches its own copy while
    that node's other ranks wait.  Every rank passes the same two barriers.
    """
    error = None
    if dist.get_rank() == 0 and not done():
        try:
            work()
        except Exception as exc:  # re-raised after the barrier so no rank hangs
            error = exc
    dist.barrier()
    if dist.get_world_size() > 1:
        if dist.get_rank() != 0 and dist.get_local_rank() == 0 and not done():
            try:
                work()
            except Exception as exc:
                error = exc
        dist.barrier()
    if error is not None:
        raise error
    if not done():
        raise fail()


def fetch(source: str, *, sha256: Optional[str] = None, desc: Optional[str] = None) -> pathlib.Path:
    """Return a local path for ``source``, downloading it into the cache when needed.

    Raises :class:`utils.errors.UsageError` for a missing local file or a checksum
    mismatch and :class:`OfflineError` when a download is impossible.
    """
    source = str(source)
    if source.startswith("file://"):
        source = urllib.parse.unquote(urllib.parse.urlsplit(source).path)
    if not is_remote(source):
        path = pathlib.Path(source).expanduser()
        if not path.is_file():
            raise UsageError(f"file not found: {source}; check the path")
        _verify_cached(path, sha256, record_digest=False)
        return path
    target = cache_path(source)
    what = desc or target.name
    if source.startswith("hf://"):
        work = lambda: _download_hf(source, target, what)  # noqa: E731
    else:
        work = lambda: _download_url(source, target, sha256, what)  # noqa: E731
    _rank0_first(work, target.is_file,
                 lambda: _offline(source, target, what, "rank 0 could not download it"))
    _verify_cached(target, sha256)
    return target


def _snapshot_complete(path: pathlib.Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def hf_snapshot(repo_id: str, subfolder: Optional[str] = None) -> pathlib.Path:
    """A local folder holding a diffusers ``from_pretrained`` model (``config.json`` + safetensors).

    The folder is ``cache_dir()/hf/<repo_id>[/<subfolder>]``; only JSON and
    safetensors files are downloaded (no pickled ``.bin`` weights).
    """
    if len([p for p in repo_id.split("/") if p]) != 2:
        raise UsageError(f"malformed Hugging Face repository id {repo_id!r}; write <org>/<name>")
    local_dir = cache_dir() / "hf" / repo_id
    target = local_dir / subfolder if subfolder else local_dir

    def work() -> None:
        import huggingface_hub

        _check_hub_reachable(f"https://huggingface.co/{repo_id}", target, repo_id)
        patterns = [f"{subfolder}/{p}" for p in _SNAPSHOT_PATTERNS] if subfolder else _SNAPSHOT_PATTERNS
        try:
            huggingface_hub.snapshot_download(repo_id, local_dir=str(local_dir), allow_patterns=patterns)
        except Exception as exc:
            raise _offline(f"https://huggingface.co/{repo_id}", target, f"{repo_id} (config.json and "
                           f"diffusion_pytorch_model.safetensors)", exc) from exc
        if not _snapshot_complete(target):
            raise UsageError(f"https://huggingface.co/{repo_id} has no config.json with safetensors "
                             f"weights{' in ' + subfolder if subfolder else ''}; check the repository id")

    _rank0_first(work, lambda: _snapshot_complete(target),
                 lambda: _offline(f"https://huggingface.co/{repo_id}", target, repo_id,
                                  "rank 0 could not download it"))
    return target


def prefetch(sources: Iterable[str]) -> list[pathlib.Path]:
    """Download every source into the cache (``hf-snapshot://<org>/<repo>[/<subfolder>]`` for folders).

    Returns the local paths in order; the first failure raises.
    """
    paths = []
    for source in sources:
        if source is None:
            continue
        source = str(source)
        if source.startswith("hf-snapshot://"):
            parts = source[len("hf-snapshot://"):].split("/")
            sub = "/".join(parts[2:]) or None
            paths.append(hf_snapshot("/".join(parts[:2]), sub))
        else:
            paths.append(fetch(source))
    return paths
