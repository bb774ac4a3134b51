"""The compressed package on disk: format, export, load, and the secure wrapper."""
from uqcit.package.export import (  # noqa: F401
    FORMAT_VERSION, METADATA_FILE, LoadedPackage, PackageError, export_package, load_package,
    package_bytes, read_metadata, write_validation)
