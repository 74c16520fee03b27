"""WebDataset shards as a dataset of images: local shards read at random, remote ones streamed.

A shard is a POSIX tar file; a sample is a run of consecutive members sharing a key, the member
name up to the first dot of its base name (``000123.jpg``, ``000123.cls``): the WebDataset format
that timm, OpenCLIP and DALI read. Of each sample only two members are read: the image (its
first member with an image extension, ``engine.image_files.IMAGE_EXTENSIONS``) and the label
(``.cls``, a decimal integer). No other member is ever decoded: ``.pyd``, ``.pickle`` or ``.pth``
members are passed over as bytes, never unpickled. Samples without an image are left out and
counted. Directories, links and ``__meta__`` members are passed over.

``--data_path`` names shards (``is_shard_source``, ``shard_urls``) as
* a local ``.tar`` file, or a brace pattern of them: ``/data/train-{000000..001023}.tar``;
* ``pipe:COMMAND``: each shard is what a shell command writes to its standard output, so object
  stores work through their own tools (``pipe:aws s3 cp s3://bucket/train-{000000..001023}.tar -``);
  accepted from the command line and --config only;
* an http(s) URL, or a brace pattern of them;
* a text file listing shards, one per line: paths (relative to the file's folder, or absolute)
  or http(s) URLs; blank lines and ``#`` comments are ignored. A text file is a shard list when
  its first entry ends in ``.tar`` or is a URL or command (else it lists images,
  ``engine.image_files``). A list never runs commands: a line starting with ``pipe:`` is an error.

``ShardIndex`` is the dataset's index, built once per run on rank 0 (``ShardIndexCache``, reused
from ``--output_dir`` while the shards are unchanged): per shard its sample count, per sample
its label and, for local shards, the offset and size of its image member, in a few numpy arrays
(forked loader workers share them). It duck-types ``engine.image_index.ImageIndex``:
``index[i]`` is sample ``i``'s image as ``NamedBytes``, which ``engine.data.ImageFiles`` decodes
like a file (unreadable images are skipped and counted the same way).

* Local (or mounted) shards: ``index[i]`` is one ``pread`` of the image member, so any order is
  cheap and the position-keyed sampler of ``engine.data`` (a shuffle over all samples, exact
  mid-epoch resume) works as on image folders.
* Remote shards (``pipe:``, URLs) are read sequentially. Counting their samples takes one pass
  over them at the first start of a run. ``stream_order`` lays an epoch out so that each loader
  worker reads a contiguous run of the shards: shards shuffled by (seed, epoch), each rank a
  contiguous share, cut into one stream per loader worker. A worker asked for a sample further on
  in its open shard reads on to it, and reopens the shard for an earlier one; a resumed run thus
  reads (and drops) the start of the shard each worker resumes in.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import tarfile
import time
import urllib.request
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import braceexpand
import numpy as np

from .checkpoint import atomic_write
from .distributed import broadcast_object, get_rank
from .errors import ConfigError
from .image_decode import NamedBytes, UnreadableImageError
from .image_files import IMAGE_EXTENSIONS
from .image_index import NO_LABEL

_logger = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
PIPE_PREFIX = "pipe:"
URL_SCHEMES = ("http://", "https://")
CLASS_LIST_NAME = "classes.txt"  # beside local shards (or the shard list): line i names label i
SHARD_INDEX_NAME = "shard_index.npz"
INDEX_FORMAT = 1
IMAGE_SUFFIXES = tuple(extension[1:] for extension in IMAGE_EXTENSIONS)  # "jpg", ...: index = extension code
OPEN_FILES = 64  # local shards kept open per process
OPEN_STREAMS = 2  # remote shards kept open per process: the stream's shard and the next
_KEY_AND_SUFFIX = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset's key rule: up to the base name's first dot


class ShardSpecError(ValueError):
    """A shard specification that names no usable shards (the message says why)."""


# ---------------------------------------------------------------- naming shards

def is_remote(url: str) -> bool:
    return url.startswith(PIPE_PREFIX) or url.startswith(URL_SCHEMES)


def _first_entry(list_path: str | os.PathLike) -> Optional[str]:
    with open(list_path, "rb") as lines:
        for line in lines:
            entry = line.strip()
            if entry and not entry.startswith(b"#"):
                return os.fsdecode(entry)
    return None


def _is_list(text: str) -> bool:
    """Whether a shard source is a list file (else a path, pattern, command or URL itself)."""
    return not (is_remote(text) or text.lower().endswith(SHARD_SUFFIX))


def is_shard_source(data_path: Optional[str | os.PathLike]) -> bool:
    """Whether ``data_path`` names WebDataset shards (see the module docstring), not images."""
    if data_path is None:
        return False
    text = os.fspath(data_path)
    if not _is_list(text):
        return True
    if not os.path.isfile(text):
        return False
    try:
        first = _first_entry(text)
    except OSError:
        return False
    return first is not None and (first.lower().endswith(SHARD_SUFFIX) or is_remote(first))


def shard_urls(data_path: str | os.PathLike) -> list[str]:
    """The shards ``data_path`` names, in order (brace patterns expanded, list entries resolved);
    ShardSpecError for a list line starting with ``pipe:`` or naming no ``.tar`` file or URL, and
    for a missing local shard."""
    text = os.fspath(data_path)
    urls = _listed_shards(text) if _is_list(text) else list(braceexpand.braceexpand(text))
    missing = [url for url in urls if not is_remote(url) and not os.path.isfile(url)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ShardSpecError(f"no such shard {missing[0]}{more}")
    return urls


def _listed_shards(list_path: str) -> list[str]:
    folder, urls = os.path.dirname(list_path), []
    with open(list_path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            if entry.startswith(PIPE_PREFIX):
                raise ShardSpecError(f"line {number} of {list_path} is a command ({entry[:40]}); a shard list names "
                                     "files or http(s) URLs only: give pipe: commands on the command line or in "
                                     "--config")
            if not entry.lower().endswith(SHARD_SUFFIX) and not entry.startswith(URL_SCHEMES):
                raise ShardSpecError(f"line {number} of {list_path} ({entry[:60]}) is no {SHARD_SUFFIX} file or "
                                     "http(s) URL; a shard list names one shard per line")
            urls.append(entry if entry.startswith(URL_SCHEMES) else os.path.join(folder, entry))
    return urls


# ---------------------------------------------------------------- reading tar members

def open_shard(url: str):
    """A binary stream of shard ``url``: a local file, an http(s) response, or a ``pipe:`` command's
    standard output (its exit status checked when read to the end and on close). The command runs
    in a session of its own: the stop signals a scheduler sends to the job's process group reach
    the training processes, which stop at an update boundary, not the commands feeding them."""
    if url.startswith(PIPE_PREFIX):
        from webdataset.gopen import Pipe

        return Pipe(url[len(PIPE_PREFIX):], mode="rb", shell=True, bufsize=1 << 20, ignore_status=[141],
                    start_new_session=True)  # 141: SIGPIPE, a stream closed before its end
    if url.startswith(URL_SCHEMES):
        return urllib.request.urlopen(url)  # noqa: S310 (http(s) only)
    return open(url, "rb")


@dataclass
class Sample:
    """One sample of a shard: ``key``, ``image`` (suffix code, what ``take`` made of the member;
    None: the sample has no image) and ``label`` (``NO_LABEL`` without a valid ``.cls``)."""

    key: str
    image: Optional[tuple[int, object]] = None
    label: int = NO_LABEL


def _parse_label(data: bytes) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return NO_LABEL


def tar_samples(tar: tarfile.TarFile, take: Callable[[tarfile.TarInfo], object]) -> Iterator[Sample]:
    """The samples of an open tar (random access or stream mode), in order; ``take(member)`` is
    called on each sample's image member while it is current (stream mode: before the next
    member is read), the ``.cls`` member is read; nothing else is."""
    sample = None
    for member in tar:
        tar.members = []  # tarfile keeps every header read otherwise
        matched = _KEY_AND_SUFFIX.match(member.name) if member.isreg() else None
        if matched is None:
            continue
        key, suffix = matched.group(1), matched.group(2).lower()
        if sample is None or key != sample.key:
            if sample is not None:
                yield sample
            sample = Sample(key)
        if sample.image is None and suffix in IMAGE_SUFFIXES:
            sample.image = (IMAGE_SUFFIXES.index(suffix), take(member))
        elif suffix == "cls" and sample.label == NO_LABEL:
            sample.label = _parse_label(tar.extractfile(member).read())
    if sample is not None:
        yield sample


@dataclass
class ShardContents:
    """What indexing one shard found: per image sample its label, and (local shards) its image
    member's extension code, offset and size; ``without_image``: samples passed over."""

    labels: list = field(default_factory=list)
    extensions: list = field(default_factory=list)
    offsets: list = field(default_factory=list)
    sizes: list = field(default_factory=list)
    without_image: int = 0


def index_shard(url: str) -> ShardContents:
    """Read the headers (local) or the whole stream (remote) of shard ``url``. A shard damaged
    part-way keeps the samples before the damage (for local shards and errors a warning says so:
    tarfile takes an invalid header for the end of the archive); OSError if it cannot be opened."""
    contents = ShardContents()
    remote = is_remote(url)
    with contextlib.closing(open_shard(url)) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|" if remote else "r:") as tar:
                for sample in tar_samples(tar, lambda member: (member.offset_data, member.size)):
                    if sample.image is None:
                        contents.without_image += 1
                        continue
                    contents.labels.append(sample.label)
                    contents.extensions.append(sample.image[0])
                    if not remote:
                        contents.offsets.append(sample.image[1][0])
                        contents.sizes.append(sample.image[1][1])
                if not remote:
                    stream.seek(tar.offset)
                    if stream.read(tarfile.BLOCKSIZE).strip(b"\0"):  # not the zero blocks that end an archive
                        raise tarfile.ReadError(f"no member header at byte {tar.offset}")
        except tarfile.TarError as error:
            _logger.warning("shard %s: damaged after its first %d samples (%s); the rest of it is left out", url,
                            len(contents.labels), error)
    return contents


# ---------------------------------------------------------------- the index

class ShardIndex:
    """The image samples of a list of shards (module docstring); ``len``, ``index[i]`` (sample ``i``'s
    image as ``NamedBytes``), ``label(i)``, ``labels``, ``classes``, ``root`` (the source named)
    like ``engine.image_index.ImageIndex``. ``streamed``: the shards are remote (read in order)."""

    def __init__(self, root: str, urls: list[str], counts: np.ndarray, labels: np.ndarray, extensions: np.ndarray,
                 offsets: np.ndarray, sizes: np.ndarray, classes: tuple[str, ...] = ()):
        self.root, self.urls, self.counts = root, urls, counts
        self.labels, self.extensions, self.classes = labels, extensions, classes
        self.offsets, self.sizes = offsets, sizes
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.streamed = any(is_remote(url) for url in urls)
        self._readers_pid = None  # open files and streams belong to the process that opened them

    def __getstate__(self) -> dict:
        return {**{name: value for name, value in self.__dict__.items() if name not in ("_files", "_streams")},
                "_readers_pid": None}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, position: int) -> tuple[int, int]:
        """(shard, sample within the shard) of sample ``position``."""
        if not 0 <= position < len(self):
            raise IndexError(f"sample {position} out of range for {len(self)} samples")
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        return shard, position - int(self.starts[shard])

    def label(self, position: int) -> int:
        return int(self.labels[position])

    def path(self, position: int) -> str:
        """Sample ``position``'s name in messages: ``<shard>:<sample within it>.<image extension>``."""
        shard, inner = self.locate(position)
        return f"{self.urls[shard]}:{inner}.{IMAGE_SUFFIXES[self.extensions[position]]}"

    def __getitem__(self, position: int) -> NamedBytes:
        """Sample ``position``'s image bytes; UnreadableImageError if its shard cannot be read there."""
        shard, inner = self.locate(position)
        name = self.path(position)
        self._own_readers()
        try:
            if self.streamed:
                data = self._reader(self._streams, shard, lambda: ShardStream(self.urls[shard]), OPEN_STREAMS)\
                    .image(inner)
            else:
                descriptor = self._reader(self._files, shard, lambda: os.open(self.urls[shard], os.O_RDONLY),
                                          OPEN_FILES)
                data = os.pread(descriptor, int(self.sizes[position]), int(self.offsets[position]))
        except OSError as error:
            raise UnreadableImageError(f"{name}: {error}") from error
        return NamedBytes(data, name)

    def __iter__(self) -> Iterator[NamedBytes]:
        return (self[position] for position in range(len(self)))

    def _own_readers(self) -> None:
        """Fresh reader caches in a new (e.g. forked worker) process: a parent's stream cannot be shared."""
        if self._readers_pid != os.getpid():
            self._readers_pid, self._files, self._streams = os.getpid(), OrderedDict(), OrderedDict()

    @staticmethod
    def _reader(cache: OrderedDict, shard: int, open_reader: Callable, capacity: int):
        """The open reader of ``shard`` in ``cache`` (opened if needed; least recently used ones closed)."""
        if shard in cache:
            cache.move_to_end(shard)
            return cache[shard]
        while len(cache) >= capacity:
            _close(cache.popitem(last=False)[1])
        cache[shard] = open_reader()
        return cache[shard]


def _close(reader) -> None:
    """Close a file descriptor, stream or ``ShardStream``; a command still writing is killed (it
    would otherwise be waited for until it noticed the closed pipe)."""
    process = getattr(reader, "proc", None)
    if process is not None and process.poll() is None:
        process.kill()
    with contextlib.suppress(OSError):
        os.close(reader) if isinstance(reader, int) else reader.close()


class ShardStream:
    """A remote shard read forward: ``image(inner)`` reads on to sample ``inner`` (reopening the
    shard to go back) and keeps the last image read, which a skipped unreadable sample's
    replacement asks for twice. Once reading fails, every later sample of the shard is
    unreadable at once (the same read would fail again)."""

    def __init__(self, url: str):
        self.url = url
        self.stream, self.samples, self.next_inner = None, None, 0
        self.last: Optional[tuple[int, bytes]] = None
        self.failed_at: Optional[int] = None

    def image(self, inner: int) -> bytes:
        if self.last is not None and self.last[0] == inner:
            return self.last[1]
        if self.failed_at is not None and inner >= self.failed_at:
            raise UnreadableImageError(f"the shard could not be read past sample {self.failed_at}")
        if self.samples is None or inner < self.next_inner:
            self._open()
        try:
            while self.next_inner <= inner:
                sample = next(self.samples)
                if sample.image is not None:
                    self.last, self.next_inner = (self.next_inner, sample.image[1]), self.next_inner + 1
        except (OSError, tarfile.TarError, StopIteration) as error:
            self.failed_at = self.next_inner
            self.close()
            reason = "it ends early (changed since it was counted?)" if isinstance(error, StopIteration) else error
            raise UnreadableImageError(f"cannot read sample {self.failed_at} of {self.url}: {reason}") from None
        return self.last[1]

    def _open(self) -> None:
        self.close()
        self.stream = open_shard(self.url)
        tar = tarfile.open(fileobj=self.stream, mode="r|")
        self.samples = tar_samples(tar, lambda member: tar.extractfile(member).read())
        self.next_inner, self.last = 0, None

    def close(self) -> None:
        if self.stream is not None:
            _close(self.stream)
        self.stream, self.samples = None, None


def read_classes(urls: list[str], list_path: Optional[str], labels: np.ndarray) -> tuple[str, ...]:
    """Class names: the lines of ``classes.txt`` beside the shard list or the first local shard,
    else the label numbers (``"0"``, ``"1"``, ... up to the largest label)."""
    folder = os.path.dirname(list_path) if list_path else (os.path.dirname(urls[0]) if not is_remote(urls[0]) else None)
    names_file = os.path.join(folder, CLASS_LIST_NAME) if folder is not None else None
    if names_file is not None and os.path.isfile(names_file):
        with open(names_file, encoding="utf-8") as lines:
            return tuple(line.strip() for line in lines if line.strip())
    return tuple(str(label) for label in range(int(labels.max(initial=-1)) + 1))


def build_shard_index(data_path: str, urls: list[str]) -> tuple[ShardIndex, np.ndarray]:
    """Index every shard (``index_shard``; remote ones are read once, a log line per tenth); returns
    the index and each local shard's (mtime_ns, size) before it was read (``ShardIndexCache``)."""
    started, parts, stamps, without_image = time.monotonic(), [], [], 0
    for number, url in enumerate(urls, 1):
        stamps.append(_stamp(url))
        try:
            parts.append(index_shard(url))
        except OSError as error:
            raise OSError(f"cannot read shard {url} ({error})") from error
        without_image += parts[-1].without_image
        if is_remote(url) and (number % max(len(urls) // 10, 1) == 0 or number == len(urls)):
            _logger.info("data: counted the samples of %d/%d shards (%.0f s)", number, len(urls),
                         time.monotonic() - started)
    if without_image:
        _logger.info("data: %d samples without an image member (%s) left out", without_image,
                     " ".join(IMAGE_EXTENSIONS))
    arrays = {name: np.array([value for part in parts for value in getattr(part, name)], dtype=dtype)
              for name, dtype in (("labels", np.int64), ("extensions", np.uint8), ("offsets", np.int64),
                                  ("sizes", np.int64))}
    counts = np.array([len(part.labels) for part in parts], dtype=np.int64)
    return ShardIndex(data_path, urls, counts, **arrays), np.array(stamps, dtype=np.int64).reshape(-1, 2)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _stamp(url: str) -> tuple[int, int]:
    """(mtime_ns, size) of a local shard; (0, 0) for a remote one (taken as unchanged)."""
    if is_remote(url):
        return 0, 0
    status = os.stat(url)
    return status.st_mtime_ns, status.st_size


class ShardIndexCache:
    """The ``ShardIndex`` of one run, saved at ``path`` (None: never saved) and reused by the next
    run of the same shards while every local shard keeps its modification time and size (remote
    shards are taken as unchanged: delete the file to count them again).
    ``load_or_build(data_path)`` runs on every rank (rank 0 reads or indexes, the others receive
    its result); ``save_pending()`` writes a fresh index (rank 0, once ``--output_dir`` exists).
    The file holds plain arrays, read with ``allow_pickle=False``."""

    def __init__(self, path: Optional[str | os.PathLike] = None):
        self.path = Path(path) if path is not None else None
        self.pending: Optional[dict] = None

    def load_or_build(self, data_path: str, flag: str = "--data_path") -> ShardIndex:
        """The index of the shards ``data_path`` names; ConfigError naming ``flag`` and ``data_path`` if
        they cannot be named or opened."""
        index, error = None, None
        if get_rank() == 0:
            try:
                index = self._reuse_or_build(data_path)
            except (ShardSpecError, OSError) as failure:
                error = f"{flag} {data_path}: {failure}"
        index, error = broadcast_object((index, error))
        if error is not None:
            raise ConfigError(error)
        return index

    def _reuse_or_build(self, data_path: str) -> ShardIndex:
        urls = shard_urls(data_path)
        list_path = data_path if _is_list(data_path) else None
        arrays = self._current_arrays(urls)
        if arrays is not None:
            _logger.info("data: reusing the index of %s saved in %s", plural(len(urls), "shard"), self.path)
            index = ShardIndex(data_path, urls, arrays["counts"], arrays["labels"], arrays["extensions"],
                               arrays["offsets"], arrays["sizes"])
        else:
            _logger.info("data: indexing %s (%s)", plural(len(urls), "shard"),
                         "remote" if any(map(is_remote, urls)) else "local")
            index, stamps = build_shard_index(data_path, urls)
            self.pending = {"format": np.array(INDEX_FORMAT), "urls": np.array(urls, dtype=str), "stamps": stamps,
                            "counts": index.counts, "labels": index.labels, "extensions": index.extensions,
                            "offsets": index.offsets, "sizes": index.sizes}
        index.classes = read_classes(urls, list_path, index.labels)
        return index

    def _current_arrays(self, urls: list[str]) -> Optional[dict]:
        if self.path is None or not self.path.is_file():
            return None
        try:
            with np.load(self.path, allow_pickle=False) as stored:
                arrays = {name: stored[name] for name in stored.files}
            current = (int(arrays["format"]) == INDEX_FORMAT and arrays["urls"].tolist() == urls
                       and np.array_equal(arrays["stamps"], np.array([_stamp(url) for url in urls]).reshape(-1, 2)))
        except (OSError, ValueError, KeyError, EOFError) as error:
            _logger.warning("data: cannot use the saved shard index %s (%s); indexing again", self.path, error)
            return None
        if not current:
            _logger.info("data: the shards changed since %s was saved; indexing again", self.path)
        return arrays if current else None

    def save_pending(self) -> Optional[Path]:
        """Write the fresh index (a failed write is a warning: the file only saves time)."""
        if self.pending is None or self.path is None:
            return None
        try:
            atomic_write(self.path, lambda file: np.savez(file, **self.pending))
        except OSError as error:
            _logger.warning("data: could not save the shard index to %s (%s); the next run indexes again",
                            self.path, error)
            return None
        self.pending = None
        return self.path


# ---------------------------------------------------------------- the order of streamed shards

def stream_order(counts: np.ndarray, shard_order: np.ndarray, rank: int, world_size: int, batch_size: int,
                 streams: int, drop_last: bool) -> np.ndarray:
    """The sample positions rank ``rank`` reads, in batch order, for samples laid out shard after
    shard in ``shard_order`` (``counts``: samples per shard).

    Each rank takes a contiguous run of that sequence: ``N // world_size`` samples with
    ``drop_last`` (the last ``N % world_size`` of the epoch are dropped, as the shuffled sampler of
    image folders drops them, and the incomplete last batch too), else ``len(range(rank, N,
    world_size))`` (evaluation: the last batch may be short). The run is cut into ``streams``
    contiguous parts and batch ``k`` is read from part ``k % streams``: a DataLoader hands batch
    ``k`` of an iterator to worker ``k % workers``, so with ``streams = workers`` each worker reads
    one part from start to end. Every rank gets the same number of batches with ``drop_last``.
    """
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    sequence = np.concatenate([np.arange(starts[shard], starts[shard + 1]) for shard in shard_order] or
                              [np.zeros(0, dtype=np.int64)])
    total = len(sequence)
    shares = np.full(world_size, total // world_size) if drop_last else \
        np.array([len(range(r, total, world_size)) for r in range(world_size)])
    share, first = int(shares[rank]), int(shares[:rank].sum())
    batches = share // batch_size if drop_last else -(-share // batch_size)
    batch_sizes = np.full(batches, batch_size, dtype=np.int64)
    if batches and not drop_last:
        batch_sizes[-1] = share - (batches - 1) * batch_size
    part = np.arange(batches) % streams
    part_starts = np.concatenate([[0], np.cumsum(np.bincount(part, weights=batch_sizes, minlength=streams))[:-1]])
    batch_starts = part_starts[part].astype(np.int64) + (np.arange(batches) // streams) * batch_size
    within = np.arange(int(batch_sizes.sum())) - np.repeat(np.cumsum(batch_sizes) - batch_sizes, batch_sizes)
    return sequence[first + np.repeat(batch_starts, batch_sizes) + within]


def check_stream_workers(path: str | os.PathLike, saved_config: dict, num_workers: int, advice: str) -> None:
    """ConfigError if checkpoint ``path`` of a run on streamed shards was written with another
    number of loader workers (0 and 1 read alike): the order of streamed shards depends on it."""
    saved = saved_config.get("num_workers")
    if saved is not None and max(saved, 1) != max(num_workers, 1):
        raise ConfigError(f"--num_workers {num_workers}: checkpoint {path} was trained on streamed shards with "
                          f"--num_workers {saved}, and their order depends on it (one stream per loader worker); "
                          f"use --num_workers {saved} {advice}")
