"""Registry of the standard image-restoration sets: layout on disk, colour mode, split, source.

Every set the harness names has one :class:`DatasetSpec`. Where the set's authors (or the
authors of the method that made it standard) publish the files in a public repository, the
spec pins that repository at a commit and ``manifests/<NAME>.sha256`` lists every file: its
sha256, where it goes under a data root, and its path in the repository. Those sets are
downloaded and verified by ``python -m harness.data fetch NAME --root DIR``
(:mod:`harness.data.fetch`). The others (DIV2K, SIDD, Manga109) have no such copy: their spec
says where to get them and where to put them.

``layout`` says where :func:`harness.data.folders.open_benchmark` looks under a root: clean
(``gt``) folders in order of preference, and for super-resolution sets stored low-resolution
folders (``lq``: folder and file-name templates, ``{s}`` the scale). The folder names of
BasicSR/Restormer/KAIR test layouts are accepted beside the one ``fetch`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"

_DNCNN = ("https://raw.githubusercontent.com/cszn/DnCNN/e93b27812d3ff523a3a79d19e5e50d233d7a8d0a",
          "cszn/DnCNN@e93b278")
_FFDNET = ("https://raw.githubusercontent.com/cszn/FFDNet/e787f46df2f374ff3591186706229cb9a0591fea",
           "cszn/FFDNet@e787f46")
_SWINIR = ("https://raw.githubusercontent.com/JingyunLiang/SwinIR/6545850fbf8df298df73d81f3e8cba638787c8bd",
           "JingyunLiang/SwinIR@6545850")
_SELFEXSR = ("https://raw.githubusercontent.com/jbhuang0604/SelfExSR/8f6dd8c1d20cb7e8792a7177b4f6fd677633f598",
             "jbhuang0604/SelfExSR@8f6dd8c")
_NO_LICENCE = "no licence file in the source repository; research use, credit the original authors"


def _sr_lq(folder: str) -> list[tuple[str, str]]:
    """BasicSR's stored-LR layouts for a super-resolution set."""
    return [(f"{folder}/LR_bicubic/X{{s}}", "{}x{s}"), (f"{folder}/LRbicx{{s}}", "{}")]


@dataclass(frozen=True)
class ManifestEntry:
    """One file of a registered set."""

    sha256: str
    local: str  # path under the data root, e.g. "Set12/01.png"
    remote: str  # path under the source's base URL


@dataclass(frozen=True)
class DatasetSpec:
    """How a standard set is laid out, what it is, and where it comes from."""

    name: str
    colour: str  # "grey", "rgb" or "mixed" (files of both kinds, loaded as stored)
    split: str  # "train", "val" or "test"
    use: str  # what the literature evaluates (or trains) on it
    gt: tuple[str, ...]  # clean-image folders under the root, first existing one wins
    lq: tuple[tuple[str, str], ...] = ()  # stored LR folders and name templates (SR)
    source: str | None = None  # repository@commit:path of the verified copy, or the homepage
    base_url: str | None = None  # manifest remote paths hang off this URL
    licence: str = _NO_LICENCE
    manual: str = ""  # where to get and put the files when there is no verified download
    notes: str = ""
    special: str | None = None  # a reader other than image folders ("sidd": .mat blocks)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def downloadable(self) -> bool:
        return self.base_url is not None and (MANIFEST_DIR / f"{self.name}.sha256").is_file()

    def manifest(self) -> list[ManifestEntry]:
        """Every file of the set (empty when there is no verified download)."""
        return list(_read_manifest(self.name)) if self.downloadable else []

    def alternates(self) -> dict[str, str]:
        """Accepted re-encodings with the same pixels (``manifests/<NAME>.alt.sha256``):
        {local path: sha256}. ``verify`` accepts them in place of the source's files."""
        path = MANIFEST_DIR / f"{self.name}.alt.sha256"
        if not path.is_file():
            return {}
        rows = (line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))
        return {local: sha for sha, local in rows}

    def placement(self, root: str | Path = "DIR", limit: int = 6) -> str:
        """Human instructions: which files go where under ``root``."""
        entries = self.manifest()
        if not entries:
            return f"{self.name}: {self.manual}".replace("{root}", str(root))
        shown = "\n".join(f"  {Path(root) / e.local}  <-  {self.base_url}/{e.remote}" for e in entries[:limit])
        more = f"\n  ... and {len(entries) - limit} more" if len(entries) > limit else ""
        return (f"{self.name}: place these {len(entries)} files (source {self.source}) under {root}:\n{shown}{more}\n"
                f"The full list with sha256 is {MANIFEST_DIR / (self.name + '.sha256')}; "
                f"`python -m harness.data verify {self.name} --root {root}` checks a copy.")


@cache
def _read_manifest(name: str) -> tuple[ManifestEntry, ...]:
    rows = []
    for line in (MANIFEST_DIR / f"{name}.sha256").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            sha, local, remote = line.split()
            rows.append(ManifestEntry(sha, local, remote))
    return tuple(rows)


def _spec(name: str, repo: tuple[str, str] | None, path: str = "", **kw) -> DatasetSpec:
    if repo is not None:
        kw.update(base_url=repo[0], source=f"{repo[1]}:{path}")
    return DatasetSpec(name=name, **kw)


DATASETS: dict[str, DatasetSpec] = {s.name: s for s in [
    _spec("Train400", _DNCNN, "TrainingCodes/DnCNN_TrainingCodes_v1.0/data/Train400", colour="grey", split="train",
          use="DnCNN's training set: 400 BSD images, grey, 180x180", gt=("Train400", "train/Train400")),
    _spec("BSD68", _DNCNN, "testsets/BSD68", colour="grey", split="test",
          use="grey Gaussian denoising (DnCNN, FFDNet, ...)", gt=("BSD68", "test/BSD68")),
    _spec("Set12", _DNCNN, "testsets/Set12", colour="grey", split="test",
          use="grey Gaussian denoising", gt=("Set12", "set12", "test/Set12")),
    _spec("CBSD68", _FFDNET, "testsets/CBSD68", colour="rgb", split="test", use="colour Gaussian denoising",
          gt=("CBSD68", "CBSD68/original_png", "cbsd68", "test/CBSD68")),
    _spec("Kodak24", _FFDNET, "testsets/Kodak24", colour="rgb", split="test", use="colour Gaussian denoising",
          gt=("Kodak24", "Kodak", "kodak24", "test/Kodak", "test/Kodak24")),
    _spec("McMaster", _FFDNET, "testsets/McMaster", colour="rgb", split="test", use="colour Gaussian denoising",
          gt=("McMaster", "McM", "mcmaster", "test/McMaster"),
          notes="the source holds TIFs; the lossless PNG re-save in manifests/McMaster.alt.sha256 (same pixels) "
                "verifies too"),
    _spec("Urban100", _SELFEXSR, "data/Urban100", colour="rgb", split="test",
          use="super-resolution; colour Gaussian denoising (Restormer/EAMamba)",
          gt=("Urban100/HR", "Urban100/GTmod12", "Urban100", "test/Urban100"),
          lq=(*_sr_lq("Urban100"),),
          notes="the authors' repository: HR = image_SRF_4/*_HR.png (the full-size images), stored LR for x4 "
                "only (their x2 folder is a half-size variant); other scales are made by MATLAB bicubic"),
    _spec("Set5", _SWINIR, "testsets/Set5", colour="rgb", split="test", use="super-resolution (Y channel)",
          gt=("Set5/HR", "Set5/GTmod12", "Set5", "set5"), lq=(*_sr_lq("Set5"),)),
    _spec("Set14", _DNCNN, "testsets/Set14", colour="mixed", split="test", use="super-resolution (Y channel)",
          gt=("Set14/HR", "Set14/GTmod12", "Set14"), lq=(*_sr_lq("Set14"),),
          notes="DnCNN's copy (BMP, two grey images); LR made by MATLAB bicubic"),
    _spec("B100", _SELFEXSR, "data/BSD100", colour="rgb", split="test", use="super-resolution (Y channel)",
          gt=("B100/HR", "BSDS100/HR", "B100/GTmod12", "B100", "BSDS100"),
          lq=(*_sr_lq("B100"), ("BSDS100/LR_bicubic/X{s}", "{}x{s}")),
          notes="the Urban100 authors' copy of BSD100: HR = image_SRF_3/*_HR.png (480x321), stored LR x2/x3/x4"),
    _spec("Manga109", None, colour="rgb", split="test", use="super-resolution (Y channel)",
          gt=("Manga109/HR", "Manga109/GTmod12", "Manga109"), lq=(*_sr_lq("Manga109"),),
          source="http://www.manga109.org/en/", licence="academic use on request (Manga109 terms); no redistribution",
          manual="request access at http://www.manga109.org/en/, then put the 109 HR PNGs in {root}/Manga109/HR/ "
                 "(optional stored LR: {root}/Manga109/LR_bicubic/X4/<name>x4.png)"),
    _spec("Classic5", _SWINIR, "testsets/classic5", colour="grey", split="test",
          use="JPEG deblocking (grey, MATLAB imwrite quality)", gt=("classic5", "Classic5", "test/classic5")),
    _spec("LIVE1", _DNCNN, "testsets/LIVE1", colour="rgb", split="test",
          use="JPEG deblocking (grey / Y channel)", gt=("LIVE1", "live1", "test/LIVE1")),
    _spec("DIV2K", None, colour="rgb", split="val", use="SR training (800 train) and validation (0801-0900)",
          gt=("DIV2K_valid_HR", "DIV2K/DIV2K_valid_HR"),
          lq=(("DIV2K_valid_LR_bicubic/X{s}", "{}x{s}"), ("DIV2K/DIV2K_valid_LR_bicubic/X{s}", "{}x{s}")),
          source="https://data.vision.ee.ethz.ch/cvl/DIV2K/", licence="academic research use (DIV2K terms)",
          manual="download DIV2K_valid_HR.zip (and DIV2K_valid_LR_bicubic_X{2,3,4}.zip) from "
                 "https://data.vision.ee.ethz.ch/cvl/DIV2K/ and unzip them in {root}: "
                 "{root}/DIV2K_valid_HR/0801.png ..., {root}/DIV2K_valid_LR_bicubic/X4/0801x4.png ..."),
    _spec("SIDD", None, colour="rgb", split="val", use="real-noise denoising (sRGB validation blocks)",
          gt=(), special="sidd", source="https://abdokamel.github.io/sidd/",
          licence="SIDD terms (research use)",
          manual="download ValidationNoisyBlocksSrgb.mat and ValidationGtBlocksSrgb.mat (SIDD benchmark page, "
                 "https://abdokamel.github.io/sidd/) into {root}/SIDD/ (or {root} itself)"),
    _spec("RNI15", _FFDNET, "testsets/RNI15", colour="mixed", split="test",
          use="real noisy images without ground truth (visual comparison only)", gt=("RNI15", "test/RNI15"),
          notes="no clean references: usable for inference and timing, not for PSNR"),
]}

#: Older names still accepted (records and configs written before the registry).
ALIASES = {"DIV2K_val": "DIV2K", "classic5": "Classic5", "BSD100": "B100", "BSDS100": "B100", "Kodak": "Kodak24"}


def get(name: str) -> DatasetSpec:
    """The spec of ``name`` (or an alias); unknown names list the registered ones."""
    key = ALIASES.get(name, name)
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; registered: {', '.join(DATASETS)}")
    return DATASETS[key]


def names() -> list[str]:
    return list(DATASETS)
