"""Decode JPEGs on the device in batches (torchvision.io.decode_jpeg, nvJPEG on CUDA) and preprocess them there
with the CPU path's own transforms (`preprocess.transform`: same resize, crop, normalisation, same boxes).

Only what the device decoder reads as Pillow would goes to it: a baseline JPEG, RGB or grey, with no EXIF
rotation (nvJPEG ignores EXIF), an end marker (a truncated file must fail, never be padded) and a header Pillow
accepts (pixel limit). Everything else, and any image the device decoder refuses, is decoded by the CPU path
(`fallback`), so failure reasons are the CPU path's; `transform`'s own checks (the aspect-ratio bound) give the
device path's images the same reasons. Reading files, routing and the fallback run in a thread
pool; batches are decoded in one background thread (on CUDA in its own stream), so the caller's LRP overlaps
with the next batch's decoding; fallback images reach the device through pinned memory.
"""
from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from .datasets.records import ImageRecord
from .faults import inject_fault
from .preprocess import DecodeError, Preprocessing, _open, read_bytes, transform
from .reading import DEFAULT_MAX_IMAGE_BYTES

# torchvision 0.29 deprecates its image codecs for TorchCodec; they are what the pinned version has, so no noise
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
DEVICE_MODES = ("RGB", "L")  # what ImageReadMode.RGB turns into the RGB Pillow's convert("RGB") gives
EXIF_ORIENTATION = 0x0112
IN_FLIGHT = 2  # decoded batches waiting for the caller: enough to overlap, little memory

Item = object  # (tensor, boxes) or the Exception that becomes the image's failure reason
Fallback = Callable[[int, ImageRecord], Item]


def route(data: bytes) -> str | None:
    """None when the device decoder reads this file as the CPU path would, else why the CPU path decodes it."""
    if not data.startswith(b"\xff\xd8\xff"):
        return "not a JPEG"
    if not data.rstrip(b"\x00\r\n ")[-2:] == b"\xff\xd9":
        return "no JPEG end marker (truncated?)"
    try:
        image = _open(data)  # header only
    except DecodeError as error:
        return f"header: {error}"
    except Exception as error:  # noqa: BLE001  (the CPU path gives the reason)
        return f"header: {type(error).__name__}"
    if image.format != "JPEG":
        return f"format {image.format}"
    if image.mode not in DEVICE_MODES:
        return f"mode {image.mode}"
    if image.info.get("progressive") or image.info.get("progression"):
        return "progressive JPEG"
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        return "EXIF orientation"
    return None


class DeviceDecoder:
    """Turns a shard's records into the worker's items, in order, decoding JPEGs on `device` in batches."""

    def __init__(self, preprocessing: Preprocessing, device: str, batch_size: int, threads: int = 2,
                 max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> None:
        self.preprocessing, self.device, self.batch_size = preprocessing, torch.device(device), max(1, batch_size)
        self.max_bytes = max_bytes  # per image, checked before reading (pipeline/reading.py)
        self.readers = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="read")
        self.decoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="device-decode")
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.routed = {"device": 0, "cpu": 0, "device_refused": 0}

    def iterate(self, records: list[ImageRecord], fallback: Fallback, skip: Iterable[int] = ()) -> Iterator[Item]:
        """One item per record, in order; `fallback(position, record)` decodes what the device does not."""
        skip = set(skip)
        staged = self.readers.map(lambda at, record: self._stage(at, record, fallback, skip),
                                  range(len(records)), records)
        pending: deque[Future] = deque()
        window: list = []
        try:
            for at, record in enumerate(records):
                window.append((at, record, next(staged)))
                device_items = sum(isinstance(item, bytes) for _, _, item in window)
                if device_items >= self.batch_size or len(window) >= 4 * self.batch_size:
                    pending.append(self.decoder.submit(self._finish, window, fallback))
                    window = []
                while len(pending) > IN_FLIGHT:
                    yield from pending.popleft().result()
            if window:
                pending.append(self.decoder.submit(self._finish, window, fallback))
            while pending:
                yield from pending.popleft().result()
        finally:
            staged.close()
            for future in pending:
                future.cancel()

    def _stage(self, at: int, record: ImageRecord, fallback: Fallback, skip: set[int]) -> Item | bytes:
        """The file's bytes when the device can decode it, else the CPU path's item (decoded or a failure)."""
        if at in skip or record.problem:
            return fallback(at, record)
        inject_fault(record.path)  # off unless LRP_FAULT_INJECT=1, as on the CPU path
        try:
            data = read_bytes(record.path, record.member, self.max_bytes)
        except DecodeError:
            return fallback(at, record)  # it reads again and records the reason
        if route(data) is not None:
            self.routed["cpu"] += 1
            return fallback(at, record)
        self.routed["device"] += 1
        return data

    def _finish(self, window: list, fallback: Fallback) -> list[Item]:
        """Decode the window's device images in one call, preprocess them, move the rest to the device."""
        if self.stream is None:
            return self._finish_here(window, fallback)
        with torch.cuda.stream(self.stream):
            items = self._finish_here(window, fallback)
        self.stream.synchronize()  # the caller's stream may use them now
        for item in items:
            if isinstance(item, tuple):
                item[0].record_stream(torch.cuda.current_stream(self.device))
        return items

    def _finish_here(self, window: list, fallback: Fallback) -> list[Item]:
        encoded = [(at, record, data) for at, record, data in window if isinstance(data, bytes)]
        pixels = self._decode_all([data for _, _, data in encoded])
        decoded = {at: image for (at, _, _), image in zip(encoded, pixels)}
        items = []
        for at, record, item in window:
            if isinstance(item, bytes):
                image = decoded[at]
                if image is None:  # the device decoder refused it: the CPU path decides
                    self.routed["device_refused"] += 1
                    item = fallback(at, record)
                else:
                    try:
                        item = transform(image, record.boxes, self.preprocessing)
                    except DecodeError as error:  # the CPU path's own check (aspect ratio): the same reason
                        item = error
                    except Exception as error:  # noqa: BLE001  (one image must not stop the shard)
                        item = DecodeError(f"preprocessing failed: {type(error).__name__}: {error}")
            if isinstance(item, tuple) and item[0].device != self.device:
                tensor = item[0].pin_memory() if self.device.type == "cuda" else item[0]
                item = (tensor.to(self.device, non_blocking=True), item[1])
            items.append(item)
        return items

    def _decode_all(self, blobs: list[bytes]) -> list[torch.Tensor | None]:
        """(3, H, W) uint8 on the device per blob, None where the decoder fails; one batched call when it can."""
        if not blobs:
            return []
        tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in blobs]
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=self.device))
        except Exception:  # noqa: BLE001  (one bad image fails the whole batch: find it)
            out: list[torch.Tensor | None] = []
            for tensor in tensors:
                try:
                    out.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=self.device))
                except Exception:  # noqa: BLE001
                    out.append(None)
            return out

    def close(self) -> None:
        self.readers.shutdown(wait=False, cancel_futures=True)
        self.decoder.shutdown(wait=False, cancel_futures=True)
