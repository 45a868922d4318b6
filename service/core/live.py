"""The live model repository: new versions go live without a restart, old ones go when no session needs them.

The server watches `--models` (every `--model-poll-s` seconds; 0 turns polling off) and loads each new
`<name>/<version>/model.onnx` off the event loop; the repository API (KServe's and Triton's extension, on REST and
gRPC) lists, loads and unloads by name only: a client never passes a path, a URL or file contents. Sessions stay
on the version they were opened on until they are deleted, expire or are reset (a reset moves a session to the
newest version); new sessions get the newest. A version that does not load (half copied, broken, not the
explicit-state contract) is reported in the index with the reason and never replaces one that serves; polling
retries it when its files change. A file still being written (changed within the last second) waits for the
next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from service.core.dataplane import DataPlane
from service.core.tasks import stop_task
from service.errors import InvalidInputError, ModelInUseError, ModelLoadFailedError, ModelNotFoundError
from service.repository import ModelLoadError, load_version

log = logging.getLogger(__name__)
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
VERSION = re.compile(r"[1-9][0-9]{0,17}")  # NOTE: ASCII digits only (str.isdigit also takes "²")
SETTLE_SECONDS = 1.0  # a model file changed more recently than this may still be being copied


@dataclass(frozen=True)
class VersionState:
    """One entry of the repository index (Triton's states: READY, UNAVAILABLE)."""

    name: str
    version: str
    state: str
    reason: str = ""


def _files(directory: Path) -> tuple[tuple[int, int], ...]:
    """What a version directory's files are now (mtime, size): a change makes a failed version worth retrying."""
    out = []
    for f in (directory / "model.onnx", directory / "model.json"):
        with contextlib.suppress(OSError):
            st = f.stat()
            out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


class LiveRepository:
    def __init__(
        self,
        dp: DataPlane,
        root: Path,
        threads: int = 1,
        poll_seconds: float = 0.0,
        one_of_workers: bool = False,
        live_scoring: bool = True,
    ) -> None:
        self.dp, self.root, self.threads, self.poll_seconds = dp, root, threads, poll_seconds
        self.live_scoring = live_scoring
        # NOTE: under --workers a load or unload call reaches one worker only: those calls are refused (polling
        # runs in every worker, so new versions still go live everywhere)
        self.one_of_workers = one_of_workers
        self._failed: dict[tuple[str, str], tuple[tuple[tuple[int, int], ...], str]] = {}
        # NOTE: versions unloaded through the API, with their files then: polling leaves them alone until their
        # files change or a load asks for them
        self._unloaded: dict[tuple[str, str], tuple[tuple[int, int], ...]] = {}
        self._lock = asyncio.Lock()  # NOTE: one load at a time (polling and the API may race for a version)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.poll_seconds > 0:
            self._task = asyncio.create_task(self._poll_loop(), name="model-repository-poll")

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.poll_once()
            except Exception:  # NOTE: never let a bad directory stop the watching
                log.exception("model repository poll failed")

    # --- the directory -----------------------------------------------------------------------------
    def _model_dir(self, name: str) -> Path:
        """The directory of a model named by a client: a plain name, and a directory right under the root."""
        d = self.root / name
        plain = MODEL_NAME.fullmatch(name) is not None and name not in (".", "..")
        if not plain or not d.is_dir() or d.resolve().parent != self.root.resolve():
            raise ModelNotFoundError(
                f"no model directory {name!r} in the model repository (names are letters, digits and . _ -)"
            )
        return d

    def _on_disk(self, name: str | None = None) -> list[Path]:
        """Version directories (`<name>/<positive integer>/model.onnx`) under the root, in version order."""
        pattern = f"{name}/*/model.onnx" if name else "*/*/model.onnx"
        found = [p.parent for p in self.root.glob(pattern) if VERSION.fullmatch(p.parent.name)]
        return sorted(found, key=lambda d: (d.parent.name, int(d.name)))

    def index(self, ready_only: bool = False) -> list[VersionState]:
        loaded = {(m.name, m.version) for m in self.dp.repo.all()}
        out = [VersionState(n, v, "READY") for n, v in sorted(loaded)]
        for d in self._on_disk():
            key = (d.parent.name, d.name)
            if key not in loaded and not ready_only:
                failed = self._failed.get(key)
                reason = (
                    failed[1] if failed
                    else "unloaded (load it to serve it again)" if key in self._unloaded
                    else "not loaded (load it, or wait for the next poll)"
                )  # fmt: skip
                out.append(VersionState(*key, "UNAVAILABLE", reason))
        return sorted(out, key=lambda s: (s.name, int(s.version)))

    # --- loading -----------------------------------------------------------------------------------
    async def _load_dir(self, d: Path) -> str | None:
        """Load one version directory off the event loop and serve it; the reason when it cannot be loaded."""
        name, version = d.parent.name, d.name
        files = _files(d)
        try:
            m = await asyncio.to_thread(load_version, d, self.threads, self.live_scoring)
        except Exception as e:  # NOTE: whatever a directory holds, it is reported and never stops the others
            why = str(e) if isinstance(e, ModelLoadError) else f"{name}/{version}: cannot load: {type(e).__name__}"
            self._failed[(name, version)] = (files, why)
            log.warning("cannot load %s/%s (the versions that serve go on serving): %s", name, version, why)
            return why
        self._failed.pop((name, version), None)
        self.dp.add_model(m)
        log.info("%s/%s is live: new sessions of %s use it", name, version, name)
        return None

    def _loaded(self, name: str, version: str) -> bool:
        return any(m.name == name and m.version == version for m in self.dp.repo.all())

    async def poll_once(self) -> list[str]:
        """Load every new version whose files have settled and did not fail as they are; return the keys loaded."""
        done = []
        async with self._lock:
            for d in self._on_disk():
                name, version = d.parent.name, d.name
                if self._loaded(name, version):
                    continue
                files = _files(d)
                if any(time.time() - mtime / 1e9 < SETTLE_SECONDS for mtime, _ in files):
                    continue  # NOTE: still being written, perhaps: next poll
                failed = self._failed.get((name, version))
                if failed is not None and failed[0] == files:
                    continue  # NOTE: failed as it is now; retried when its files change
                if self._unloaded.get((name, version)) == files:
                    continue  # NOTE: unloaded on purpose; a new copy of its files (or a load) brings it back
                if await self._load_dir(d) is None:
                    done.append(f"{name}/{version}")
        return done

    def _refuse_under_workers(self) -> None:
        if self.one_of_workers:
            raise InvalidInputError(
                "with --workers the repository API would change one worker only: copy new versions in (every worker "
                "polls --models) and restart to unload, or run one worker per replica"
            )

    async def load(self, name: str) -> list[str]:
        """Load every version of `name` on disk that does not serve yet (the repository API's load); the versions
        loaded. A version that fails is an error that says why; the ones that loaded stay."""
        self._refuse_under_workers()
        d = self._model_dir(name)
        loaded, errors = [], []
        async with self._lock:
            for v in self._on_disk(d.name):
                if self._loaded(name, v.name):
                    continue
                self._unloaded.pop((name, v.name), None)
                why = await self._load_dir(v)
                if why is None:
                    loaded.append(v.name)
                else:
                    errors.append(why)
        if errors:
            done = f" (loaded: {', '.join(loaded)})" if loaded else ""
            raise ModelLoadFailedError("; ".join(errors) + done)
        if not loaded and not any(m.name == name for m in self.dp.repo.all()):
            raise ModelLoadFailedError(f"no version of {name!r} to load: put one at {name}/<version>/model.onnx")
        return loaded

    async def unload(self, name: str, version: str | None = None, force: bool = False) -> tuple[list[str], int]:
        """Unload one version, or every version of a model; the versions unloaded and the sessions ended."""
        self._refuse_under_workers()
        if version is not None and not (version.isdigit() and int(version) > 0):
            raise InvalidInputError(f"version must be a positive integer; got {version!r}")
        versions = [version] if version else [m.version for m in self.dp.repo.versions(name)]
        if len(versions) > 1:  # NOTE: all or nothing: check every version before unloading any
            if len(self.dp.repo.all()) == len(versions):
                raise ModelInUseError(f"model {name!r} is the last model this server serves; load another one first")
            for v in versions:
                n = await self.dp.store.count(self.dp.get_model(name, v).key)
                if n and not force:
                    raise ModelInUseError(
                        f"model {name!r} version {v} has {n} open session(s); unload with force to end them"
                    )
        ended = 0
        for v in versions:
            ended += await self.dp.remove_model(name, v, force)
            self._unloaded[(name, v)] = _files(self.root / name / v)
        return versions, ended
