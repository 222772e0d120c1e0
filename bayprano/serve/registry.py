"""The model registry: a folder holding every site's adapted models, their versions and access tokens.

Layout under the registry root::

    registry.json                   kind, format, the meta-checkpoint that /adapt starts from, admin token hash
    checkpoints/<sha12>.pt          meta-checkpoints copied in by ``set_checkpoint``
    sites/<site>/site.json          created, token hash (sha256 of the token; the token itself is never
                                    stored), the token's scopes
    sites/<site>/current            the live version's name, e.g. ``v0002``
    sites/<site>/versions/v0001/    a site model folder (model.pt, meta.json, roi.png if its region is a mask) plus version.json

A site token has scopes: ``score`` and ``review`` by default, ``adapt`` only when granted. A version
published without activation is a candidate until ``promote`` makes it current. A site keeps at most
``keep`` versions (publish deletes the oldest ones, never the current one). ``version.json`` records the
sha256 of ``model.pt`` at publish; ``check_version`` compares it before a server loads the version, so
that a model folder rewritten afterwards (``model.pt`` and ``meta.json`` together) is refused. Publish
refuses a model adapted on another backbone than the registry's meta-checkpoint.

A version is written into a staging folder, checked by loading it, and renamed into place: a reader sees
a whole version or none. Version numbers are allocated by that rename (it fails on an existing, non-empty
folder), and the ``current`` pointer is replaced atomically, so a server reading it per request sees the
old or the new version, never a half-written one. Changes to one site are serialised with a file lock.

Tokens are 256-bit random strings, so a plain sha256 of each is enough to store them safely; they are
compared in constant time. A ``Registry`` keeps an index from token hash to site in memory and the admin
token's hash, so that a token which is nobody's costs no file read: the index is rebuilt when
``sites/.changed`` (rewritten by every change made through a ``Registry``: a new site, a rotated token, a
publish, promote or rollback, in any process) or the ``sites`` folder itself changes, the admin hash when
``registry.json`` does. A token found in the index is still checked against its site's ``site.json``. Nothing here imports Ray: the registry is used by the server, the operator's
command line and tests alike.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator

from bayprano.platform.errors import ConfigError, DataError
from bayprano.platform.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text, check_kind_and_format

REGISTRY_KIND = "bayprano-model-registry"
REGISTRY_FORMAT = 1
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VERSION_NAME = re.compile(r"^v(\d{4,})$")
TOKEN_BYTES = 32
SCOPES = ("score", "review", "adapt")
DEFAULT_SCOPES = ("score", "review")
KEEP_VERSIONS = 20
CHANGES_FILE = ".changed"  # under sites/: rewritten on every change, so that readers know to refresh


FileStamp = tuple[int, int, int, int]  # inode, size, mtime and ctime in ns: changes when the file is replaced


def _stamp(path: Path) -> FileStamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return "bp_" + secrets.token_urlsafe(TOKEN_BYTES)


def check_site_name(site: str) -> str:
    if not isinstance(site, str) or not SITE_NAME.match(site):
        raise ConfigError(
            f"site name {site!r} is not valid: use 1-64 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return site


def check_scopes(scopes) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(scopes))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise ConfigError(
            f"scopes {', '.join(map(repr, unknown)) or '(none)'} not valid: choose from {', '.join(SCOPES)}"
        )
    return scopes


def version_name(number: int) -> str:
    return f"v{number:04d}"


def model_id(site: str, version: str) -> str:
    """The multiplexed model id a site's version is served under."""
    return f"{site}@{version}"


def parse_model_id(mid: str) -> tuple[str, str]:
    site, sep, version = mid.partition("@")
    if not sep or not SITE_NAME.match(site) or not VERSION_NAME.match(version):
        raise DataError(f"model id {mid!r} is not of the form site@vNNNN")
    return site, version


@dataclass(frozen=True)
class VersionInfo:
    site: str
    version: str
    record: dict  # the contents of version.json

    @property
    def path(self) -> Path:
        return Path(self.record["path"])


class Registry:
    """A registry root folder. ``Registry.init(root)`` creates one; ``Registry(root)`` opens an existing one."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._token_sites: tuple[tuple[FileStamp | None, ...], dict[str, str], frozenset[str]] | None = None
        self._admin_hash: tuple[FileStamp, str] | None = None
        path = self.root / "registry.json"
        if not path.is_file():
            raise DataError(
                f"{self.root}: not a model registry (no registry.json; create one with `bayprano registry init`)"
            )
        meta = self._read_json(path)
        check_kind_and_format(meta, path, REGISTRY_KIND, "a bayprano model registry", REGISTRY_FORMAT, "registry")

    # ----------------------------------------------------------------------------------------- root

    @classmethod
    def init(cls, root: str | os.PathLike, checkpoint: str | os.PathLike | None = None) -> tuple["Registry", str]:
        """Create a registry at ``root`` (an empty or missing folder); returns it and the admin token,
        which is shown to the operator once and stored only as a hash."""
        root = Path(root)
        if (root / "registry.json").exists():
            raise ConfigError(f"{root}: a registry already exists here")
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise ConfigError(f"{root}: exists and is not an empty folder; refusing to turn it into a registry")
        root.mkdir(parents=True, exist_ok=True)
        (root / "sites").mkdir(exist_ok=True)
        token = new_token()
        atomic_write_json(
            root / "registry.json",
            {
                "kind": REGISTRY_KIND,
                "format": REGISTRY_FORMAT,
                "created": _now(),
                "checkpoint": None,
                "admin_token_sha256": hash_token(token),
            },
        )
        registry = cls(root)
        if checkpoint is not None:
            registry.set_checkpoint(checkpoint)
        return registry, token

    @property
    def meta(self) -> dict:
        return self._read_json(self.root / "registry.json")

    def set_checkpoint(self, path: str | os.PathLike) -> str:
        """Copy a meta-checkpoint into the registry and make it the one /adapt starts from; returns its sha256."""
        from bayprano.platform.meta.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)  # refuses a file that is not a readable meta-checkpoint
        target = self.root / "checkpoints" / f"{ckpt.sha256[:12]}.pt"
        if not target.is_file():
            atomic_write_bytes(target, Path(path).read_bytes())
        with self._lock("registry"):
            meta = self.meta
            meta["checkpoint"] = {
                "path": str(target.relative_to(self.root)),
                "sha256": ckpt.sha256,
                "backbone": ckpt.backbone,
                "backbone_fingerprint": ckpt.backbone_fingerprint,
                "image_size": ckpt.image_size,
                "set": _now(),
                "source": str(path),
            }
            atomic_write_json(self.root / "registry.json", meta)
        return ckpt.sha256

    def checkpoint_path(self) -> Path:
        info = self.meta.get("checkpoint")
        if not info:
            raise ConfigError(
                f"{self.root}: the registry names no meta-checkpoint to adapt from "
                "(set one with `bayprano registry set-checkpoint`)"
            )
        return self.root / info["path"]

    def check_admin_token(self, token: str | None) -> bool:
        if not token:
            return False
        expected = self._admin_token_hash()
        return bool(expected) and hmac.compare_digest(hash_token(token), expected)

    def _admin_token_hash(self) -> str:
        """The admin token's hash, read again only when registry.json has changed."""
        stamp = _stamp(self.root / "registry.json")
        if stamp is None or self._admin_hash is None or self._admin_hash[0] != stamp:
            expected = self.meta.get("admin_token_sha256")  # raises when registry.json is gone
            if stamp is None:
                return expected if isinstance(expected, str) else ""
            self._admin_hash = (stamp, expected if isinstance(expected, str) else "")
        return self._admin_hash[1]

    def rotate_admin_token(self) -> str:
        token = new_token()
        with self._lock("registry"):
            meta = self.meta
            meta["admin_token_sha256"] = hash_token(token)
            atomic_write_json(self.root / "registry.json", meta)
        return token

    # ---------------------------------------------------------------------------------------- sites

    def sites(self) -> list[str]:
        folder = self.root / "sites"
        if not folder.is_dir():
            return []
        return sorted(p.name for p in folder.iterdir() if SITE_NAME.match(p.name) and (p / "site.json").is_file())

    def has_site(self, site: str) -> bool:
        return isinstance(site, str) and bool(SITE_NAME.match(site)) and (self._site_dir(site) / "site.json").is_file()

    def add_site(self, site: str, scopes=DEFAULT_SCOPES) -> str:
        """Register a site whose token has ``scopes``; returns the token (shown once, stored only as a hash)."""
        check_site_name(site)
        scopes = check_scopes(scopes)
        folder = self._site_dir(site)
        if (folder / "site.json").exists():
            raise ConfigError(f"site {site!r} already exists in {self.root}")
        (folder / "versions").mkdir(parents=True, exist_ok=True)
        token = new_token()
        atomic_write_json(
            folder / "site.json",
            {
                "site": site,
                "created": _now(),
                "token_sha256": hash_token(token),
                "token_rotated": None,
                "scopes": list(scopes),
            },
        )
        self._note_change()
        return token

    def rotate_token(self, site: str) -> str:
        """Give a site a new token; the old one stops working at once."""
        self._require_site(site)
        token = new_token()
        with self._lock(site):
            record = self._read_json(self._site_dir(site) / "site.json")
            record["token_sha256"] = hash_token(token)
            record["token_rotated"] = _now()
            atomic_write_json(self._site_dir(site) / "site.json", record)
            self._note_change()
        return token

    def check_token(self, site: str, token: str | None) -> bool:
        """Whether ``token`` is this site's token (constant-time comparison of hashes)."""
        return self.token_scopes(site, token) is not None

    def token_scopes(self, site: str, token: str | None) -> tuple[str, ...] | None:
        """The scopes of ``token`` on ``site``; None when it is not that site's token (without reading a file
        when the token is no site's)."""
        if not token:
            return None
        index, unreadable = self._token_index()
        if index.get(hash_token(token)) != site and site not in unreadable:
            return None
        if not self.has_site(site):
            return None
        record = self._read_json(self._site_dir(site) / "site.json")  # an unreadable one raises: the server's fault
        if not hmac.compare_digest(hash_token(token), str(record.get("token_sha256", ""))):
            return None
        return tuple(record.get("scopes", DEFAULT_SCOPES))

    def site_of_token(self, token: str | None) -> str | None:
        """The site whose token ``token`` is, if any (without reading a file when it is no site's)."""
        site = self._token_index()[0].get(hash_token(token)) if token else None
        if site is None:
            return None
        try:
            expected = str(self._read_json(self._site_dir(site) / "site.json").get("token_sha256", ""))
        except DataError:
            return None
        return site if token and hmac.compare_digest(hash_token(token), expected) else None

    def _token_index(self) -> tuple[dict[str, str], frozenset[str]]:
        """Token hash -> site, and the sites whose site.json could not be read, rebuilt from every site.json
        when the registry has changed. The hash of a 256-bit random token cannot be steered by a client, so
        looking it up in a dictionary leaks nothing that a constant-time comparison would hide; callers still
        compare with the site's own record."""
        sites = self.root / "sites"
        stamp = (_stamp(sites), _stamp(sites / CHANGES_FILE))  # taken first: a change while reading rebuilds again
        if self._token_sites is None or self._token_sites[0] != stamp:
            index: dict[str, str] = {}
            unreadable: set[str] = set()
            for site in self.sites():
                try:
                    digest = self._read_json(self._site_dir(site) / "site.json").get("token_sha256")
                except DataError:
                    unreadable.add(site)  # checked against its file again, which fails as the server's fault
                    continue
                if isinstance(digest, str):
                    index[digest] = site
            self._token_sites = (stamp, index, frozenset(unreadable))
        return self._token_sites[1], self._token_sites[2]

    def scopes(self, site: str) -> tuple[str, ...]:
        self._require_site(site)
        return tuple(self._read_json(self._site_dir(site) / "site.json").get("scopes", DEFAULT_SCOPES))

    # ------------------------------------------------------------------------------------- versions

    def versions(self, site: str) -> list[VersionInfo]:
        self._require_site(site)
        folder = self._site_dir(site) / "versions"
        names = sorted(
            (p.name for p in folder.iterdir() if VERSION_NAME.match(p.name) and p.is_dir()), key=lambda n: int(n[1:])
        )
        return [self.version(site, n) for n in names]

    def version(self, site: str, version: str) -> VersionInfo:
        self._require_site(site)
        if not isinstance(version, str) or not VERSION_NAME.match(version):
            raise DataError(f"version {version!r} is not of the form vNNNN")
        path = self._site_dir(site) / "versions" / version
        if not (path / "version.json").is_file():
            raise DataError(f"site {site!r} has no version {version}")
        record = self._read_json(path / "version.json")
        record["path"] = str(path)
        return VersionInfo(site, version, record)

    def current(self, site: str) -> str | None:
        """The live version's name, or None before the first publish."""
        self._require_site(site)
        try:
            name = (self._site_dir(site) / "current").read_text().strip()
        except FileNotFoundError:
            return None
        return name or None

    def current_model_id(self, site: str) -> str | None:
        version = self.current(site)
        return None if version is None else model_id(site, version)

    def model_path(self, site: str, version: str) -> Path:
        return self.version(site, version).path

    def check_version(self, site: str, version: str) -> Path:
        """The version's model folder, once the sha256 of its ``model.pt`` matches the one ``version.json``
        recorded at publish; a ``DataError`` naming the site and version (not the path) otherwise."""
        info = self.version(site, version)
        expected = info.record.get("model_sha256")
        try:
            actual = hashlib.sha256((info.path / "model.pt").read_bytes()).hexdigest()
        except OSError:
            raise DataError(f"site {site!r} version {version}: model.pt is missing") from None
        if not expected or not hmac.compare_digest(actual, expected):
            raise DataError(
                f"site {site!r} version {version}: model.pt does not match the sha256 recorded when it "
                "was published; refusing to load it"
            )
        return info.path

    def publish(
        self,
        site: str,
        model: Any,
        metrics: dict | None = None,
        source: str = "",
        make_current: bool = True,
        keep: int = KEEP_VERSIONS,
    ) -> VersionInfo:
        """Publish a site model (a ``SiteModel`` or a site model folder) as the site's next version.

        The model is written (or copied) into a staging folder, loaded back to check it (and its backbone
        against the registry's meta-checkpoint), and renamed into place; then the ``current`` pointer moves
        to it (unless ``make_current`` is False: a candidate, made live by ``promote``). Then the oldest
        versions beyond ``keep`` are deleted, never the current one.
        """
        from bayprano.platform.model.site import ROI_MASK_FILE, SiteModel

        self._require_site(site)
        versions = self._site_dir(site) / "versions"
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=versions))
        try:
            if isinstance(model, SiteModel):
                model.save(staging / "model")
                for name in ("model.pt", "meta.json", ROI_MASK_FILE):
                    if name == ROI_MASK_FILE and not (staging / "model" / name).is_file():
                        continue
                    os.replace(staging / "model" / name, staging / name)
                (staging / "model").rmdir()
            else:
                src = Path(model)
                for name in ("model.pt", "meta.json"):
                    if not (src / name).is_file():
                        raise DataError(f"{src}: not a site model folder ({name} is missing)")
                    shutil.copyfile(src / name, staging / name)
                if (src / ROI_MASK_FILE).is_file():  # a region of interest given as a mask
                    shutil.copyfile(src / ROI_MASK_FILE, staging / ROI_MASK_FILE)
            loaded = SiteModel.load(staging)  # checks kind, format and the sha256 of model.pt
            info = loaded.info
            serving = self._serving_fingerprint()
            if serving is not None and info.get("backbone_fingerprint") != serving:
                raise ConfigError(
                    f"site {site!r}: the model was adapted on backbone "
                    f"{info.get('backbone_fingerprint')}, but this registry serves {serving} (its "
                    "meta-checkpoint's backbone); refusing to publish it"
                )
            with self._lock(site):
                number = 1 + max((int(p.name[1:]) for p in versions.iterdir() if VERSION_NAME.match(p.name)), default=0)
                version = version_name(number)
                record = {
                    "site": site,
                    "version": version,
                    "published": _now(),
                    "created": info.get("created"),
                    "support_size": info.get("support_size"),
                    "checkpoint_sha256": info.get("checkpoint_sha256"),
                    "backbone": info.get("backbone"),
                    "image_size": loaded.image_size,
                    "threshold": loaded.threshold,
                    "target_fpr": loaded.target_fpr,
                    "model_sha256": info.get("model_sha256"),
                    "source": source,
                    "metrics": {
                        "loo_statistics": info.get("loo_statistics"),
                        "adapt_seconds": info.get("adapt_seconds"),
                        **(metrics or {}),
                    },
                }
                atomic_write_json(staging / "version.json", record)
                os.rename(staging, versions / version)  # the lock makes the name free; rename is atomic
                if make_current:
                    self._set_current(site, version)
                self._trim_versions(site, keep)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return self.version(site, version)

    def _serving_fingerprint(self) -> str | None:
        info = self.meta.get("checkpoint")
        if not info:
            return None
        if info.get("backbone_fingerprint"):
            return info["backbone_fingerprint"]
        from bayprano.platform.meta.checkpoint import load_checkpoint

        return load_checkpoint(self.root / info["path"]).backbone_fingerprint

    def _trim_versions(self, site: str, keep: int) -> None:
        folder = self._site_dir(site) / "versions"
        names = sorted((p.name for p in folder.iterdir() if VERSION_NAME.match(p.name)), key=lambda n: int(n[1:]))
        current = self.current(site)
        for name in [n for n in names if n != current][: max(0, len(names) - max(1, int(keep)))]:
            doomed = folder / f".deleting-{name}"
            os.rename(folder / name, doomed)  # out of sight at once; then removed
            shutil.rmtree(doomed, ignore_errors=True)

    def promote(self, site: str, version: str | None = None) -> str:
        """Make a version current (default: the newest one); returns its name."""

        def newest(names: list[str], current: str | None) -> str:
            if not names:
                raise ConfigError(f"site {site!r} has no version to promote")
            return names[-1]

        return self._point_current(site, version, newest)

    def rollback(self, site: str, to: str | None = None) -> str:
        """Point ``current`` at version ``to`` (default: the newest version older than the current one)."""

        def previous(names: list[str], current: str | None) -> str:
            older = [n for n in names if current is not None and int(n[1:]) < int(current[1:])]
            if not older:
                raise ConfigError(f"site {site!r}: no version older than {current or 'none'} to roll back to")
            return older[-1]

        return self._point_current(site, to, previous)

    def _point_current(self, site: str, version: str | None, default: Callable[[list[str], str | None], str]) -> str:
        """Point ``current`` at ``version``, or at ``default(versions, current)`` when it is None."""
        with self._lock(site):
            names = [v.version for v in self.versions(site)]
            to = default(names, self.current(site)) if version is None else version
            if to not in names:
                raise ConfigError(f"site {site!r} has no version {to} (versions: {', '.join(names) or 'none'})")
            self._set_current(site, to)
        return to

    def describe(self, site: str) -> dict:
        """Site, current version and every version's record (without secrets)."""
        cur = self.current(site)
        created = self._read_json(self._site_dir(site) / "site.json").get("created")
        versions = []
        for v in self.versions(site):
            record = {k: val for k, val in v.record.items() if k != "path"}
            record["current"] = v.version == cur
            versions.append(record)
        return {"site": site, "created": created, "current": cur, "versions": versions}

    # -------------------------------------------------------------------------------------- helpers

    def _set_current(self, site: str, version: str) -> None:
        atomic_write_text(self._site_dir(site) / "current", version + "\n")
        self._note_change()

    def _note_change(self) -> None:
        """Tell every Registry on this folder, in any process, that a site changed (see ``_token_index``)."""
        atomic_write_text(self.root / "sites" / CHANGES_FILE, f"{time.time_ns()} {secrets.token_hex(8)}\n")

    def _site_dir(self, site: str) -> Path:
        return self.root / "sites" / site

    def _require_site(self, site: str) -> None:
        if not self.has_site(site):
            raise DataError(f"unknown site {site!r} in registry {self.root}")

    @contextlib.contextmanager
    def _lock(self, name: str) -> Iterator[None]:
        lock_dir = self.root / ".locks"
        lock_dir.mkdir(exist_ok=True)
        with open(lock_dir / f"{name}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _read_json(path: Path) -> dict:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise DataError(f"{path}: missing from the registry") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a JSON object")
        return data
