"""The canonical schema file: one ``.safetensors`` whose header metadata says what it is (docs/schema.md).

It is the adapter exactly as adaptools holds it (method, resolved config, base, provenance), so reading
it needs no translation and writing it loses nothing."""

from __future__ import annotations

from pathlib import Path

from adaptools import plugin
from adaptools.plugin import (
    Adapter,
    FileStore,
    InputError,
    ReadOptions,
    SafetensorsFile,
    WriteOptions,
    parse_metadata,
    read_header,
)


class SchemaFormat(plugin.AdapterFormat):
    name = "schema"
    description = f"adaptools schema v{plugin.SCHEMA_VERSION}: one .safetensors with metadata"
    writes_directory = False

    def detect(self, path: Path) -> bool:
        """A ``.safetensors`` file that is not PEFT's, or any file whose header says it is a schema file: the
        content decides, so an output named without a suffix (``adaptools combine A B merged``) reads back."""
        if not path.is_file():
            return False
        try:
            return "adaptools.schema" in read_header(path).metadata
        except InputError:  # a corrupt .safetensors is ours to report; another file is not ours at all
            return path.suffix == ".safetensors" and path.name != "adapter_model.safetensors"

    def read(self, path: Path, options: ReadOptions) -> Adapter:
        file = SafetensorsFile(path)
        _, method, config, base, provenance = parse_metadata(file.metadata, path)
        store = FileStore({name: (file, name) for name in file.keys()})
        return Adapter(method=method, config=config, tensors=store, base=base, provenance=provenance,
                       source=str(path))

    def write(self, adapter: Adapter, path: Path, options: WriteOptions = WriteOptions()) -> None:
        tensors = {name: adapter.tensor(name) for name in sorted(adapter.tensor_names())}
        plugin.save_tensors(path, tensors, adapter.metadata())
