"""The model zoo: architectures, stacked training, the in-memory zoo and its store."""

from know2vec_jax.zoo.architectures import ARCHITECTURES, CONV_IMPLS, flops_per_image, make_model
from know2vec_jax.zoo.build import BuildConfig, ImagePool, build_zoo, build_zoo_to
from know2vec_jax.zoo.specs import ModelSpec, PRESETS, demo_specs, preset_specs, tiny_specs
from know2vec_jax.zoo.store import load_zoo, read_manifest, save_zoo
from know2vec_jax.zoo.train import StackSpec, apply_stack, init_stack, train_stack
from know2vec_jax.zoo.zoo import ModelRecord, Zoo, ZooError, ZooStack
