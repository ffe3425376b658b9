"""``zhilu data prepare``: sources, cleaning, deduplication, tokenization and shards (:mod:`.pipeline`)."""

from zhilu.data.prepare.pipeline import PrepareOptions, prepare

__all__ = ["PrepareOptions", "prepare"]
