"""The models ``tierserve local`` serves besides (or instead of) the samples: packages made by
``tierserve package``, found in folders (``--models DIR``) and optionally chosen by a catalog
(``--catalog PATH``, the file ``cdk deploy`` reads, whose entries name the exact bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tierserve.catalog import MANIFEST_NAME, Catalog, ManifestError
from tierserve.tools.packaging import PackagedModel, PackagingError, read_package

# Where `tierserve package` writes (NAME/VERSION below it), so where --catalog looks by default.
DEFAULT_PACKAGES_DIR = Path(".tierserve") / "packages"


class LocalModelsError(ValueError):
    """A ``--models`` folder or ``--catalog`` that cannot be served; the message says the fix."""


def find_packages(folder: Path) -> list[PackagedModel]:
    """The packages in ``folder``: the folder itself when it holds a ``manifest.json``, else
    every ``NAME/VERSION`` (or ``NAME``) folder below it that does, as ``tierserve package``
    lays them out. Each is read and checked (digests, no symlinks) by :func:`read_package`.

    Raises:
        LocalModelsError: no such folder, no package in it, or a package that is not usable.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise LocalModelsError(
            f"--models {folder}: no such folder; give a folder of `tierserve package` output"
        )
    manifests = [folder / MANIFEST_NAME] if (folder / MANIFEST_NAME).exists() else []
    manifests = manifests or sorted(
        [*folder.glob(f"*/{MANIFEST_NAME}"), *folder.glob(f"*/*/{MANIFEST_NAME}")]
    )
    if not manifests:
        raise LocalModelsError(
            f"--models {folder}: no package there (a folder with {MANIFEST_NAME} and its artifact, or "
            "NAME/VERSION folders of them): make one with `tierserve package model.onnx --name NAME "
            f"--version V --out {folder}/NAME/V`"
        )
    return [_read(path.parent) for path in manifests]


def _read(directory: Path) -> PackagedModel:
    try:
        return read_package(directory)
    except FileNotFoundError as error:
        problem = f"{error.filename or error} is missing"
    except (ManifestError, PackagingError, ValueError) as error:
        problem = str(error)
    raise LocalModelsError(
        f"--models: {directory} is not a usable package ({problem}): package the model again"
    )


def user_models(folders: Sequence[Path], catalog_path: Path | None = None) -> list[PackagedModel]:
    """The packages to serve from ``folders`` (default, with a catalog: where ``tierserve
    package`` writes); with ``catalog_path``, exactly the catalog's entries, each found by its
    name, version and stored digest.

    Raises:
        LocalModelsError: a folder or package that cannot be served, a catalog that cannot be
            read, a catalog entry with no package, or two versions of one model.
    """
    if catalog_path is None:
        return one_version_each(p for folder in folders for p in find_packages(folder))
    try:
        catalog = Catalog.load(catalog_path) if Path(catalog_path).is_file() else None
    except ManifestError as error:
        raise LocalModelsError(f"--catalog: {error}") from None
    if catalog is None:
        raise LocalModelsError(f"--catalog {catalog_path}: no such file; give the catalog cdk.json names")
    folders = list(folders) or [DEFAULT_PACKAGES_DIR]
    found = {
        (p.manifest.name, p.manifest.version, p.manifest.stored.sha256): p
        for folder in folders
        for p in find_packages(folder)
    }
    chosen = []
    for entry in catalog.entries:
        package = found.get((entry.name, entry.version, entry.manifest.stored.sha256))
        if package is None:
            raise LocalModelsError(
                f"--catalog {catalog_path} lists {entry.name}@{entry.version}, but no package under "
                f"{', '.join(map(str, folders))} holds it (same name, version and sha256): pass --models "
                f"with the folder `tierserve package` wrote it to"
            )
        chosen.append(package)
    return chosen


def one_version_each(packages: Iterable[PackagedModel]) -> list[PackagedModel]:
    """``packages``, refusing two versions of one model (a stack serves one version of each,
    as a deployment does)."""
    by_name: dict[str, PackagedModel] = {}
    for package in packages:
        seen = by_name.get(package.manifest.name)
        if seen is not None and seen.manifest.version != package.manifest.version:
            raise LocalModelsError(
                f"--models holds {package.manifest.name}@{seen.manifest.version} ({seen.directory}) and "
                f"@{package.manifest.version} ({package.directory}): serve one, by pointing --models at "
                "its folder or choosing with --catalog"
            )
        by_name[package.manifest.name] = package
    return list(by_name.values())
