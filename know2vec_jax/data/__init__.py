"""Image sources and task sampling."""

from know2vec_jax.data.sources import (BUILTIN_SOURCES, DataError, SourceData, list_sources,
                                       load_source, process_shard, shard_range)
from know2vec_jax.data.tasks import (Task, few_shot, make_task, sample_tasks, stable_seed,
                                     task_images, task_split)
from know2vec_jax.data.transforms import TRANSFORMS, parse_source_name
