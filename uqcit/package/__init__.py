"""The compressed package on disk: format, export, load, and the secure wrapper (``uqcit.package.secure``)."""
from uqcit.package.export import StagedPackage, export_package, stage_package, write_validation
from uqcit.package.format import (
    FORMAT_VERSION, METADATA_FILE, LoadedPackage, PackageError, PackageMetadata, SecurityError, package_bytes,
    read_metadata)
from uqcit.package.load import load_package

__all__ = [
    "FORMAT_VERSION", "METADATA_FILE", "LoadedPackage", "PackageError", "PackageMetadata", "SecurityError",
    "StagedPackage", "export_package", "load_package", "package_bytes", "read_metadata", "stage_package",
    "write_validation",
]
