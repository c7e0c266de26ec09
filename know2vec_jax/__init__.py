"""know2vec-jax: Know2Vec black-box model-zoo vectorization and few-shot model retrieval in JAX.

The public API, re-exported here (see the README for a walk-through):

- data: :func:`load_source`, :func:`sample_tasks`, :class:`Task`, :func:`few_shot`
- zoo: :func:`build_zoo`, :func:`build_zoo_to` (across processes), :func:`save_zoo`, :func:`load_zoo`, :func:`preset_specs`
- black boxes: :class:`CallableBlackBox`, :func:`groups_from_zoo`
- knowledge: :func:`extract_knowledge`, :class:`KnowledgeConfig`
- backbone: :class:`Backbone`, :func:`train_backbone` (labelled (source, class) pairs and a
  contrastive loss on unlabelled images), :func:`fit_backbone` (from arrays)
- probe pool: :class:`PoolConfig`, :class:`Pool`, :func:`build_pool` (``SOURCE[@SPLIT]`` or
  ``folder:PATH`` entries; by default test splits, never a zoo model's training images)
- vectorizers (Flax NNX): :class:`ModelVectorizer`, :class:`QueryVectorizer`, :class:`Know2Vec`
- aligner: :class:`Trainer`, :class:`AlignConfig`, :class:`RankingObjective`,
  :class:`TransferObjective`, :func:`train_step`, :func:`ranking_loss`
- index: :class:`ModelIndex` (storage ``float32 | bfloat16 | int8``, :func:`quantize_int8`);
  retrieval (:mod:`know2vec_jax.retrieval`): :class:`Retriever` (scores an index's models for
  described queries), its settings :class:`MatchConfig` and fitted statistics
  :class:`Calibration`; class-level matching :mod:`know2vec_jax.classmatch`
- multi-process stages: :mod:`know2vec_jax.distributed` (``initialize``, the work split)
- pipeline (black boxes -> training data, shared by the proxy and every experiment):
  :func:`probe_pool`, :class:`Cache`, :class:`LabelledSet`, :class:`TransferLabels`
- proxy (a trained, saved Know2Vec): :class:`Proxy`, :func:`proxy_preset`, :func:`query`
  (training :mod:`know2vec_jax.training`, storage :mod:`know2vec_jax.proxy_store`);
  fine-tune selection (``Proxy.select``): :class:`SelectionConfig`, :func:`draw_targets`,
  :func:`fit_head`, :func:`finetunable`, :func:`finetune_labels`
- configs: :func:`override` (dotted ``key=value``), :func:`to_dict`, :func:`from_dict`,
  :class:`Presets`
- transferability: :func:`finetune_accuracy`, :func:`ground_truth`, :class:`TransferTarget`,
  :class:`TransferData` (the aligner's SF-MTE objective), metrics :func:`weighted_tau`,
  :func:`ranking_report`; baselines :data:`BASELINES`, :func:`run_baseline`,
  :func:`forward_passes` (:mod:`know2vec_jax.baselines`)
"""

from know2vec_jax.align import (AlignConfig, AlignData, RankingObjective, Trainer, TransferData,
                                TransferObjective, listwise_loss, ranking_loss, train_step)
from know2vec_jax.backbone import (Backbone, BackboneConfig, BackboneError, fit_backbone,
                                   train_backbone)
from know2vec_jax.baselines import BASELINES, BaselineInputError, forward_passes, run_baseline
from know2vec_jax.blackbox import (BlackBoxError, BlackBoxGroup, BudgetExceededError,
                                   CallableBlackBox, InputError, StackGroup, check_images,
                                   groups_from_zoo)
from know2vec_jax.config import ConfigError, Presets, from_dict, override, to_dict
from know2vec_jax.data import (DataError, SourceData, Task, few_shot, list_sources, load_source,
                               make_task, sample_tasks, task_images, task_split)
from know2vec_jax.features import anchor_features, check_query, knowledge_features, query_grid
from know2vec_jax.index import IndexStoreError, ModelIndex, quantize_int8
from know2vec_jax.knowledge import (Knowledge, KnowledgeConfig, KnowledgeStore, expected_queries,
                                    extract_knowledge, grid_inputs)
from know2vec_jax import classmatch, distributed
from know2vec_jax.mesh import data_mesh
from know2vec_jax.metrics import (first_correct_rank, pearson, ranking_report, retrieval_metrics,
                                  spearman, top1_regret, weighted_tau, weighted_tau_symmetric)
from know2vec_jax.pipeline import Cache, LabelledSet, TransferLabels, finetune_labels, probe_pool
from know2vec_jax.pool import Pool, PoolConfig
from know2vec_jax.pool import build as build_pool
from know2vec_jax.probe import stack_logits
from know2vec_jax.retrieval import Calibration, MatchConfig, Matches, Retriever
from know2vec_jax.proxy import (Proxy, ProxyConfig, ProxyError, proxy_preset, query, zoo_metadata,
                                zoo_tasks)
from know2vec_jax.selection import SelectionConfig, draw_targets, finetunable, fit_head
from know2vec_jax.transfer import (FinetuneConfig, TransferError, TransferTarget,
                                   finetune_accuracy, ground_truth, noise_ceiling, run_sample,
                                   split_half)
from know2vec_jax.vectorizers import (AccuracyHead, Know2Vec, ModelVectorizer, QueryVectorizer,
                                      VectorizerConfig, pad_grid)
from know2vec_jax.zoo import (BuildConfig, ModelSpec, Zoo, ZooError, build_zoo, build_zoo_to,
                              load_zoo, make_model, preset_specs, save_zoo)

__version__ = "0.1.0"
