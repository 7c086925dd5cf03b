"""Block record format v1 and its codecs: header, byte planes + zstd, int8/int4, checksums.

``encode_block``/``decode_block`` turn one layer's block (K and V, each ``[kv_heads, ntok,
head_dim]``) into a self-describing, checksummed record and back; ``seal_envelope`` /
``open_envelope`` do the same for any other record (summaries, sessions).
"""

from .config import CODEC_IDS, DEFAULT_GROUP, DEFAULT_LEVEL, CodecConfig
from .envelope import open_envelope, seal_envelope
from .readers import RawBlockReader, SlotReader, ZstdBlockReader
from .record import HEADER_SIZE, MAX_RAW_LEN, RecordHeader, decode_block, encode_block, read_header, verify_record

__all__ = ["CODEC_IDS", "DEFAULT_GROUP", "DEFAULT_LEVEL", "HEADER_SIZE", "MAX_RAW_LEN", "CodecConfig",
           "RawBlockReader", "RecordHeader", "SlotReader", "ZstdBlockReader", "decode_block", "encode_block", "open_envelope", "read_header", "seal_envelope",
           "verify_record"]
