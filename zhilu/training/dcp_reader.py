"""Reading DCP checkpoints without running code from them.

Loading never runs code from a checkpoint. Every load first checks each file against the
manifest's SHA-256 (which catches damage, not tampering: whoever can write the files can
rewrite the manifest), then reads through :class:`CheckpointReader`:

* ``.metadata`` is a pickle, which DCP's ``FileSystemReader`` reads with plain
  ``pickle.load``. Here it goes through :class:`_MetadataUnpickler`, which resolves only the
  globals in :data:`_ALLOWED` (DCP's metadata dataclasses, ``_StorageInfo``, ``torch.Size``,
  torch dtypes and layouts, ``pathlib.PosixPath``: what ``pickletools.dis`` shows in the
  ``.metadata`` of every plan zhilu writes) and refuses any other, so the metadata can only
  be built of those objects. It must describe tensors only, stored in files the manifest lists.
* Tensor data (``__R_N.distcp``) are read by DCP with ``torch.load(weights_only=True)``:
  torch's own restricted unpickler, which builds tensors and plain containers only.
* DCP's "bytes" items would be read with ``torch.load(weights_only=False)``, an
  unrestricted unpickle. zhilu never saves them: ``BytesStorageMetadata`` is not on the
  allow-list and :meth:`CheckpointReader.read_data` refuses any bytes item.

So the only objects unpickled from a checkpoint are allow-listed metadata objects and the
tensors torch's weights-only loader builds. (With a process group DCP also exchanges its
plans and the parsed metadata between ranks as pickles; those come from zhilu's own
processes, not from the checkpoint.)
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType

from zhilu.errors import ZhiluError

FIELD = "checkpoint.resume"
_DCP_MD = "torch.distributed.checkpoint.metadata"
# Every global a DCP .metadata of zhilu refers to (pickletools.dis of checkpoints saved with
# dp, zero=3, tp and pp plans), plus pathlib's 3.13 module name. Torch dtypes are allowed by
# type below. Nothing here runs code: dataclasses, torch.Size, an enum, a path, and
# torch.serialization._get_layout (which looks a torch.layout up by its name).
_ALLOWED = {
    (_DCP_MD, "Metadata"), (_DCP_MD, "TensorStorageMetadata"), (_DCP_MD, "TensorProperties"),
    (_DCP_MD, "ChunkStorageMetadata"), (_DCP_MD, "MetadataIndex"), (_DCP_MD, "StorageMeta"),
    (_DCP_MD, "_MEM_FORMAT_ENCODING"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib._local", "PosixPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: globals off the allow-list are refused."""

    def __init__(self, file: Any, where: Path) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise ZhiluError(FIELD, f"{self.where}: its .metadata refers to {module}.{name}, which DCP metadata never "
                         "holds; zhilu refuses to load it (unpickling it could run code from the checkpoint)")


class CheckpointReader(FileSystemReader):
    """DCP's file reader without its unrestricted unpickling (see the module docstring).

    ``files``: the only files the metadata may name (a checkpoint's manifest); None: any
    plain file name inside the checkpoint directory."""

    def __init__(self, path: Path, files: set[str] | None = None) -> None:
        super().__init__(path)
        self.where, self.files = Path(path), files

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback for rank-local metadata, which zhilu never writes
            raise self._refuse("has no global .metadata")
        try:
            data = (self.where / ".metadata").read_bytes()
            metadata = _MetadataUnpickler(io.BytesIO(data), self.where).load()
        except ZhiluError:
            raise
        except Exception as e:  # truncated or garbage pickle, missing file
            raise self._refuse(f"has an unreadable .metadata ({type(e).__name__}: {e})") from None
        self._check(metadata)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Any:
        if any(item.type == LoadItemType.BYTE_IO for item in plan.items):  # torch.load(weights_only=False)
            raise self._refuse("holds a pickled object (a DCP bytes item), not only tensors")
        return super().read_data(plan, planner)

    def _check(self, md: Any) -> None:
        if not (isinstance(md, Metadata) and isinstance(md.state_dict_metadata, dict)
                and isinstance(md.storage_data, dict) and isinstance(md.storage_meta, (StorageMeta, type(None)))):
            raise self._refuse("has a .metadata that is not DCP metadata")
        if not all(isinstance(v, TensorStorageMetadata) for v in md.state_dict_metadata.values()):
            raise self._refuse("holds something other than tensors")
        for index, info in md.storage_data.items():
            name = getattr(info, "relative_path", None)
            if not (isinstance(index, MetadataIndex) and isinstance(info, _StorageInfo) and plain(name)
                    and (self.files is None or name in self.files)):
                raise self._refuse(f"has a .metadata that names {name!r}, not a file of this checkpoint")

    def _refuse(self, what: str) -> ZhiluError:
        return ZhiluError(FIELD, f"{self.where} {what}; zhilu refuses to load it")


def plain(name: Any) -> bool:
    """A file name directly inside a directory (no path, no '.' or '..')."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and not any(c in name for c in ("/", "\\", "\0")))
