"""``fastkd.cache``: an on-disk cache of teacher outputs: sparse (top-k log-probs or sample counts per token)
or dense (the teacher's final hidden states per token plus its LM head once: :mod:`fastkd.cache.hidden`).

Layout of a cache directory::

    index.json                 format, settings, and the list of complete shards (the source of truth)
    shard-00000.safetensors    one shard: several examples, tensors below, T = tokens in the shard
    ...

Tensors of a shard (safetensors, compact dtypes):
    ``offsets``   (E + 1,) int64   token offset of each example inside the shard
    ``ids``       (T, K) int16 (V < 2^15), (T, K) int16 holding id+1 as uint16 bits (V < 2^16), or
                  (T, ceil(K·b/8)) uint8 with id+1 bit-packed in b = ceil(log2(V+1)) bits (larger V; 17 bits
                  for V = 128256); 0 / −1 = padding slot. ``id_format`` "int32" stores plain int32.
    ``values``    (T, K) float16 / bfloat16 / float32 log-probs, or uint8 / int32 sample counts
    ``tail``      (T,) log of the teacher mass outside the K ids (top-k caches, ``store_tail``)
    ``input_ids`` (T,) int32 token ids of the example (optional)
    ``lse``       (T, J) float32 log-normaliser at each of the index's ``temperatures`` (1.0 first), and
    ``tails``     (T, J) log tail mass at each (only with ``temperatures``; :mod:`fastkd.cache.temper`)
    ``hidden``    (T, H) bf16 / fp16 / fp32 teacher hidden states (``values="hidden"``, instead of ids/values;
                  the head is ``lm_head.safetensors``, its size, CRC-32 and SHA-256 in the index)

Format version 3 (hidden-state caches, temperatures); version-2 indexes are read as sparse caches without
temperatures, and a resumed version-2 cache is rewritten as version 3.

Crash safety: a shard is written to a temporary file, fsynced and renamed (and the directory fsynced), then
``index.json`` is replaced atomically the same way (:func:`fastkd.cache.io.fsync_write`). A writer that dies
mid-way leaves every shard listed in the index readable; a writer opened with ``resume=True`` continues after
the last complete shard (``writer.n_examples`` says how many examples to skip). One writer per directory: a
writer holds an exclusive lock on ``.lock`` and a second one raises :class:`CacheLockedError`.

Untrusted caches (:mod:`fastkd.cache.format`, :mod:`fastkd.cache.io`): the index is validated field by
field (a missing or malformed key raises :class:`CacheCorruptedError` naming it), only plain file names
inside the directory are opened (no symlinks), sizes are checked before reading, every shard's CRC-32 is
checked when it is read (SHA-256 of every shard with ``verify=True``), each shard is bound to its position
and the index settings by its own metadata, and its tensors are validated (monotonic offsets, shapes,
ids < V). Every problem raises :class:`CacheCorruptedError` naming the cache file.

Validated writes (:mod:`fastkd.cache.validate`): :meth:`TeacherCacheWriter.add` refuses, with a
``ValueError`` naming the argument, what the losses would refuse on read (an id twice in one token, NaN or
positive log-probs, a top-k mass above 1, positive log tail masses, ...); ``validate=False`` skips these data
checks for speed.

Building from a teacher: :meth:`TeacherCacheWriter.add_from_hidden` takes the teacher's final hidden
states and LM-head weight and computes top-k log-probs, the tail and log-normaliser at every stored
temperature (or samples) in one LM-head pass per chunk (:mod:`fastkd.cache.extract`): peak memory
O(chunk · V), never (N, V) logits. On CUDA tensors the top-k, lse and tails come from the streaming Triton
kernel of ``kernels/topk.py`` in one read of each chunk (``topk_backend="auto"``; torch on CPU; tested under
the interpreter, not yet timed on a GPU).

Package layout, each module importing only those above it in this list:
``ids`` (id encodings) → ``format`` (index schema, shard validation) → ``io`` (files, checksums, crash-safe
writes, the lock) → ``validate`` (write checks), ``temper`` (re-tempering, stats), ``extract`` (teacher →
targets on the LM-head engine) → ``hidden`` (hidden-state caches) → ``writer`` → ``reader`` (reader +
Dataset) → ``cli`` (``fastkd cache-teacher``).
"""

from fastkd.cache.extract import extract_topk, sample_from_hidden, topk_from_hidden
from fastkd.cache.format import FORMAT, INDEX, VERSION, CacheCorruptedError, CacheLockedError
from fastkd.cache.ids import choose_id_format, decode_ids, encode_ids, id_bits
from fastkd.cache.reader import TeacherCache, TeacherCacheDataset
from fastkd.cache.temper import at_temperature, cache_stats
from fastkd.cache.writer import TeacherCacheWriter

__all__ = ["FORMAT", "INDEX", "VERSION", "CacheCorruptedError", "CacheLockedError", "TeacherCache",
           "TeacherCacheDataset", "TeacherCacheWriter", "at_temperature", "cache_stats", "choose_id_format",
           "decode_ids", "encode_ids", "extract_topk", "id_bits", "sample_from_hidden", "topk_from_hidden"]
