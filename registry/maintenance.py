"""Registry maintenance: verify (re-hash), gc (drop unreferenced files), export (plain PEFT folders)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from adaptr.errors import ConflictError, IntegrityError, InvalidInputError
from adaptr.registry.adapter_dir import CONFIG, WEIGHTS
from adaptr.registry.blobs import fsync_dir, hash_file
from adaptr.registry.models import GcReport, StoredFile, VerifyReport
from adaptr.registry.refs import Ref

EXPORT_FORMATS = ("peft", "vllm")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # removed by a concurrent gc
        return 0


class Maintenance:
    """Mixed into :class:`Registry`; uses its index, blob store and writer lock."""

    def verify(self, ref: str | Ref | None = None) -> VerifyReport:
        """Re-hash every stored file (of ``ref`` only, if given) and check the index.

        The index is read as one snapshot; what a concurrent ``rm``/``gc`` removes meanwhile
        is re-checked against the index before it is called a problem. A full check also
        compares the index with the version manifests and counts unreferenced blobs.
        """
        report = VerifyReport()
        conn = self._conn()
        if conn is None:
            return report
        conn.execute("BEGIN")  # one read snapshot (WAL): writers go on meanwhile
        try:
            versions = [self.get(ref)] if ref is not None else self.list()
            if ref is None:
                status = conn.execute("PRAGMA integrity_check").fetchone()[0]
                if status != "ok":
                    report.problems.append(f"index: {status}")
        finally:
            conn.execute("COMMIT")
        seen: dict[str, str | None] = {}
        for v in versions:
            report.versions += 1
            for f in v.files:
                report.files += 1
                if f.sha256 not in seen:
                    seen[f.sha256] = self._check_blob(f)
                    report.bytes += f.size
                if seen[f.sha256] and self._indexed(v.name, v.version):
                    report.problems.append(f"{v.ref}/{f.path}: {seen[f.sha256]}")
        if ref is None:
            self._check_manifests(report, {(v.name, v.version) for v in versions})
            manifests = self._check_journal(report, versions)
            for link in self.blobs.strays():
                report.problems.append(
                    f"{link}: a link in the blob store (to {os.path.realpath(link)}); adaptr "
                    "never follows it: replace it with the file, or remove it"
                )
            used = {f.sha256 for v in versions for f in v.files}
            used.update(f["sha256"] for m in manifests for f in m["files"])
            for digest in self.blobs.digests():
                if digest not in used:
                    report.unreferenced += 1
                    report.unreferenced_bytes += _size(self.blobs.path(digest))
        return report

    def _indexed(self, name: str, version: int) -> bool:
        """Whether the index lists ``name@version`` now (a fresh read, not the snapshot)."""
        return bool(
            self._rows("SELECT 1 FROM versions WHERE name=? AND version=?", (name, version))
        )

    def _check_manifests(self, report: VerifyReport, indexed: set[tuple[str, int]]) -> None:
        if not self.journal.exists():
            report.notes.append(
                "no version manifests yet: the next write to the registry adds them"
            )
            return
        on_disk = {(p.parent.name, int(p.stem)) for p in self.journal.committed_paths()}
        for name, version in sorted(on_disk - indexed):
            # checked again in the order writers move manifests, so concurrent writes never count
            if not self._indexed(name, version) and self.journal.committed(name, version).exists():
                report.problems.append(
                    f"{name}@{version}: stored (manifest and files) but missing from the index; "
                    "run `adaptr reindex` to restore it"
                )
        for name, version in sorted(indexed - on_disk):
            # indexed, no manifest, and indexed still: a remove that committed meanwhile and
            # then deleted its manifest is gone from the index by the second read
            if (
                self._indexed(name, version)
                and not self.journal.has_manifest(name, version)
                and self._indexed(name, version)
            ):
                report.problems.append(
                    f"{name}@{version}: indexed but its manifest is missing; run `adaptr reindex`"
                    " after a backup of registry.db, or re-add the version"
                )

    def _check_journal(self, report: VerifyReport, versions) -> list[dict]:
        """Every manifest parses and is whole, ``state.json`` too, and each indexed version's
        files are the ones its manifest lists; returns the whole manifests."""
        good, damaged = self.journal.read_manifests()
        for d in damaged:
            if d.path.exists():  # not removed meanwhile
                report.problems.append(
                    f"{d}: run `adaptr reindex`, which rewrites it from the index while the "
                    "index still lists the version"
                )
        _, problem = self.journal.read_state()
        if problem:
            report.problems.append(f"{problem}: the next write to the registry rewrites it")
        listed = {(m["name"], m["version"]): m["files"] for m in good}
        for v in versions:
            files = listed.get((v.name, v.version))
            if files is None:
                continue
            want = sorted((f["path"], f["sha256"], f["size"]) for f in files)
            have = sorted((f.path, f.sha256, f.size) for f in v.files)
            if want != have and self._indexed(v.name, v.version):
                report.problems.append(
                    f"{v.ref}: the index lists {len(have)} file(s) and its manifest {len(want)}, "
                    "not the same: run `adaptr reindex` to rebuild the index from the manifests"
                )
        return good

    def _check_blob(self, f: StoredFile) -> str | None:
        try:
            digest, size = hash_file(self.blobs.path(f.sha256))
        except FileNotFoundError:  # never stored, or removed by a gc after the snapshot
            return "missing"
        if size != f.size:
            return f"size {size} != recorded {f.size}"
        if digest != f.sha256:
            return f"content changed (sha256 {digest[:12]}…, recorded {f.sha256[:12]}…)"
        return None

    def gc(self) -> GcReport:
        """Delete blobs no version references and files left staged by interrupted writers.

        Refused when the index has lost its records (see ``index_lost``); blobs that a
        version manifest references are kept even when the index does not list the version.
        """
        report = GcReport()
        with self._writer() as conn:
            good, damaged = self.journal.read_manifests()
            if damaged:
                listed = "; ".join(str(d) for d in damaged[:3])
                raise IntegrityError(
                    f"gc refused: {len(damaged)} version manifest(s) cannot be read, and the files "
                    f"they list may be the only copy ({listed}); nothing was deleted. Run "
                    "`adaptr verify`, then `adaptr reindex` to rewrite them from the index"
                )
            report.staged_removed_bytes = self.blobs.clear_tmp()
            used = {r[0] for r in conn.execute("SELECT DISTINCT sha256 FROM files")}
            indexed = {(r[0], r[1]) for r in conn.execute("SELECT name, version FROM versions")}
            for rec in good:  # every digest a manifest lists, whatever the index says
                used.update(f["sha256"] for f in rec["files"])
                if (rec["name"], rec["version"]) not in indexed:
                    report.kept_unindexed.append(f"{rec['name']}@{rec['version']}")
            for digest in list(self.blobs.digests()):
                if digest not in used:
                    report.bytes_freed += self.blobs.remove(digest)
                    report.blobs_removed += 1
        return report

    def reclaimable(self) -> int:
        """Bytes that :meth:`gc` would free from unreferenced blobs."""
        used = {r[0] for r in self._rows("SELECT DISTINCT sha256 FROM files")}
        used.update(f["sha256"] for rec in self.journal.manifests() for f in rec["files"])
        return sum(self.blobs.path(d).stat().st_size for d in self.blobs.digests() if d not in used)

    def export(
        self, ref: str | Ref, out: str | Path, *, format: str = "peft", force: bool = False
    ) -> Path:
        """Write a plain PEFT adapter folder for ``ref`` (hashes re-checked while copying).

        ``format="vllm"`` writes only the config and weights, and refuses what vLLM cannot load.
        """
        if format not in EXPORT_FORMATS:
            raise InvalidInputError(
                f"unknown export format {format!r}: use one of {', '.join(EXPORT_FORMATS)}"
            )
        from adaptr.registry.atomic import refuse_in_home, remove_work, replace_dir, work_dir

        v = self.get(ref)
        out = Path(out).expanduser()
        # a user's output never goes into the store; adaptr's own runs export parents there
        refuse_in_home(out, self.home, "an export", inside_ok=(self.home / "runs",))
        if out.exists() and not out.is_dir():
            raise ConflictError(f"{out} exists and is not a folder; choose another output path")
        if out.is_dir() and any(out.iterdir()) and not force:
            raise ConflictError(f"{out} exists and is not empty; pass --force to replace it")
        files = v.files
        if format == "vllm":
            if v.summary.get("use_dora"):
                raise InvalidInputError(
                    f"{v.ref} uses DoRA, which vLLM cannot serve; export with --format peft"
                )
            files = [f for f in files if f.path in (CONFIG, WEIGHTS)]
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = work_dir("export", out.parent)
        try:
            for f in files:
                self._copy_checked(f, staging / f.path, v.ref)
            fsync_dir(staging)
            replace_dir(staging, out)
        finally:
            remove_work(staging)  # the folder, then its record
        return out

    def _copy_checked(self, f: StoredFile, dest: Path, ref: str) -> None:
        src = self.blobs.path(f.sha256)
        if not src.is_file():
            raise IntegrityError(f"{ref}/{f.path} is missing from the store; run `adaptr verify`")
        h = hashlib.sha256()
        with open(src, "rb") as fin, open(dest, "wb") as fout:
            while chunk := fin.read(8 << 20):
                h.update(chunk)
                fout.write(chunk)
            fout.flush()
            os.fsync(fout.fileno())
        if h.hexdigest() != f.sha256:
            raise IntegrityError(
                f"{ref}/{f.path} is corrupt in the store (hash mismatch); run `adaptr verify`"
            )
