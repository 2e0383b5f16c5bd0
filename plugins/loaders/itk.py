"""ITK formats (``.nrrd``, ``.nhdr``, ``.mha``, ``.mhd``) through SimpleITK, within the reading limits.

The image information (size, pixel type) is read first and checked against
``ANOMALY3D_MAX_VOXELS``/``ANOMALY3D_MAX_BYTES`` before the voxel data is read.
"""

from __future__ import annotations

import re
from pathlib import Path

import SimpleITK as sitk

from anomaly3d_core.errors import DataError
from anomaly3d_core.interfaces import VolumeLoader
from anomaly3d_core.io import limits
from anomaly3d_core.io.sitk_geometry import image_to_volume, volume_to_image
from anomaly3d_core.io.volume import Volume
from anomaly3d_plugins.loaders import examples

# the key that names the separate data file of a detached header
_DATA_FILE = {".mhd": r"^\s*ElementDataFile\s*=\s*(.+?)\s*$", ".nhdr": r"^\s*data ?file\s*:\s*(.+?)\s*$"}


def _reason(path: Path, exc: Exception) -> str:
    """What went wrong, in words that name the cause and the fix."""
    text = str(exc).strip()
    last = text.splitlines()[-1].removeprefix("sitk::ERROR:").strip() if text else "unreadable"
    if "Unable to determine ImageIO reader" in text:
        return "not an image SimpleITK can read (its content matches no ITK format reader)"
    pattern = _DATA_FILE.get(path.suffix.lower())
    if pattern:
        try:
            head = path.read_bytes()[:65536].decode("latin-1")
        except OSError:
            head = ""
        match = re.search(pattern, head, re.MULTILINE | re.IGNORECASE)
        if match and match.group(1) not in ("LOCAL", "LIST") and "%" not in match.group(1):
            data = path.parent / match.group(1)
            if not data.is_file():
                return (
                    f"its header names the data file '{match.group(1)}', which is not in {path.parent}; "
                    f"keep the data file next to the {path.suffix} header"
                )
    return f"corrupt or unreadable ITK image ({last})"


def referenced_files(path: Path) -> list[str]:
    """The data files a MetaImage or NRRD header names besides itself (none when its data is attached).

    Covers one file (``ElementDataFile = x.raw``, ``data file: x.raw``), ``LIST`` (names on the
    following lines) and numbered patterns (``slice%03d.raw 1 40 1``).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16).decode("latin-1")
    except OSError:
        return []
    lines = head.splitlines()
    nrrd = head.startswith("NRRD")
    for i, line in enumerate(lines):
        if nrrd and not line.strip():
            return []  # the header ends at the first blank line
        key, sep, value = line.partition(":" if nrrd else "=")
        if not sep or key.strip().lower().replace(" ", "") != ("datafile" if nrrd else "elementdatafile"):
            continue
        value = value.strip()
        if not nrrd and value.upper() == "LOCAL":
            return []
        words = value.split()
        if words and words[0].upper() == "LIST":
            return [n.strip() for n in lines[i + 1 :] if n.strip()]
        if "%" in value and len(words) >= 4:
            try:
                lo, hi, step = int(words[1]), int(words[2]), int(words[3])
                return [words[0] % k for k in range(lo, hi + (1 if step > 0 else -1), step or 1)][:100_000]
            except (ValueError, TypeError):
                return [value]
        return [value]
    return []


def check_references(path: Path) -> None:
    """Refuse a header that makes the reader open files elsewhere: any data file in a request's
    payload, and outside the header's own folder for a local file unless the user allows it."""
    names = referenced_files(path)
    if not names:
        return
    if limits.reading_untrusted():
        raise DataError(
            path,
            "its header names a separate data file; a request must carry the image data inside the file "
            "(.nii.gz, or .nrrd/.mha with attached data)",
        )
    if limits.external_data_allowed():
        return
    folder = path.parent.resolve()
    for name in names:
        target = (path.parent / name).resolve()
        if not target.is_relative_to(folder):
            raise DataError(
                path,
                f"its header names the data file '{name}', outside the header's folder {path.parent}; keep the "
                f"data next to the header, or set {limits.EXTERNAL_DATA_ENV}=1 to allow it",
            )


def check_information(reader: sitk.ImageFileReader, path: str | Path, n_files: int = 1) -> None:
    """Refuse an image whose header claims more than the limits, before its data is read."""
    size = [int(s) for s in reader.GetSize()]
    if n_files > 1:  # one slice per file (a multi-frame file counts its frames)
        size = size[:2] + [n_files * (size[2] if len(size) > 2 else 1)]
    components = reader.GetNumberOfComponents()
    itemsize = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID()).GetSizeOfPixelComponent()
    limits.check_claim(path, size + ([components] if components > 1 else []), itemsize)


class ItkLoader(VolumeLoader):
    name = "itk"
    extensions = (".nrrd", ".nhdr", ".mha", ".mhd")

    @classmethod
    def sniff(cls, path: Path) -> bool:
        """NRRD (``NRRD000x`` magic) or a MetaImage header (``ObjectType = Image`` near the top)."""
        try:
            with open(path, "rb") as f:
                head = f.read(1024)
        except OSError:
            return False
        return head.startswith(b"NRRD") or re.search(rb"^\s*ObjectType\s*=\s*Image", head, re.M) is not None

    @classmethod
    def example_file(cls, folder: Path) -> list[Path]:
        volume = examples.example_volume()
        paths = []
        for ext in (".nrrd", ".mha", ".mhd"):
            path = Path(folder) / f"example{ext}"
            sitk.WriteImage(volume_to_image(volume.array, volume.affine), str(path))
            paths.append(path)
        return paths

    @classmethod
    def example_volume(cls) -> Volume:
        return examples.example_volume()

    def load(self, path: str | Path) -> Volume:
        path = Path(path)
        check_references(path)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
            check_information(reader, path)
            image = reader.Execute()
        except RuntimeError as exc:
            raise DataError(path, _reason(path, exc)) from None
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise DataError(
                path,
                f"{image.GetNumberOfComponentsPerPixel()} components per voxel; a scalar volume is needed",
            )
        volume = image_to_volume(image, str(path))
        volume.meta["format"] = "itk"
        return volume
