"""The probe pool: entries, rows shared by the domains of a source, the split's share left for
queries, folders of unlabelled images, provenance; an index's own pool (probing, queries,
storage, the CLI)."""

import json

import numpy as np
import pytest
from PIL import Image

from know2vec_jax import pool as pool_lib
from know2vec_jax.blackbox import groups_from_zoo
from know2vec_jax.config import ConfigError
from know2vec_jax.data import DataError, Task, few_shot, load_source
from know2vec_jax.index import IndexStoreError, ModelIndex
from know2vec_jax.proxy import ProxyError, zoo_metadata


def test_entries_parse_and_default_to_test_splits():
  assert pool_lib.parse_entry("digits+invert") == pool_lib.PoolEntry("digits+invert", "test")
  assert pool_lib.parse_entry("mnist5k@train").split == "train"
  assert pool_lib.parse_entry("folder:/a/b@c/d").source == "folder:/a/b@c/d"
  assert pool_lib.parse_entry("folder:/imgs").split == "files"
  for bad, match in [("digits@val", "unknown split 'val'"), ("", "non-empty"),
                     ("digits+wobble", "unknown transform"), ("folder:/x@test", "no splits")]:
    with pytest.raises(ConfigError, match=match):
      pool_lib.parse_entry(bad)
  cfg = pool_lib.PoolConfig()
  assert [e.name for e in pool_lib.entries(cfg, ["mnist5k", "digits"])] == [
      "digits@test", "mnist5k@test"]
  with pytest.raises(ConfigError, match="names no source"):
    pool_lib.entries(cfg, [])
  with pytest.raises(ConfigError, match="max_share must be in"):
    pool_lib.PoolConfig(max_share=0.0)


def test_rows_are_shared_by_domains_capped_and_excluded_from_queries():
  cfg = pool_lib.PoolConfig(sources=("digits", "digits+invert", "mnist5k@train"), per_source=400)
  pool = pool_lib.build(cfg, (), 0, (28, 28, 1))
  digits, inv, mnist = pool.provenance
  n_test = len(load_source("digits").test_labels)
  # At most half of the split: the rest stays for queries.
  assert digits["images"] == inv["images"] == n_test // 2 and mnist["images"] == 400
  assert digits["rows"] == inv["rows"]  # every domain of a source holds the same images
  assert len(pool) == sum(p["images"] for p in pool.provenance)
  np.testing.assert_array_equal(pool.images[:digits["images"]],
                                load_source("digits").test_images[digits["rows"]])
  np.testing.assert_array_equal(pool.images[2 * digits["images"]:],
                                load_source("mnist5k").train_images[mnist["rows"]])
  # The rows a query must avoid: the same whatever the domain, and computable without a pool.
  held = pool_lib.excluded_rows(pool.provenance, "digits+rot90", "test")
  assert held.tolist() == sorted(digits["rows"])
  np.testing.assert_array_equal(pool_lib.config_rows(cfg, "digits+blur", "test", 0), held)
  assert not len(pool_lib.excluded_rows(pool.provenance, "mnist5k", "test"))
  assert len(pool_lib.excluded_rows(pool.provenance, "mnist5k", "train")) == 400
  data = load_source("digits")
  task = Task("digits", (0, 1, 2, 3))
  x, _ = few_shot(data, task, 5, seed=0, exclude=held)
  pool_set = {im.tobytes() for im in data.test_images[held]}
  assert not any(im.tobytes() in pool_set for im in x)
  with pytest.raises(DataError, match="outside the probe pool"):
    few_shot(data, task, 40, seed=0, exclude=held)


def _write_images(root, n, seed=0):
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  for i in range(n):
    Image.fromarray((rng.random((10, 12)) * 255).astype(np.uint8)).save(root / f"{i}.png")


def test_a_folder_of_unlabelled_images_is_a_pool(tmp_path):
  _write_images(tmp_path / "imgs" / "sub", 5)
  _write_images(tmp_path / "imgs", 3, seed=1)
  pool = pool_lib.build(pool_lib.PoolConfig(sources=(f"folder:{tmp_path / 'imgs'}",)), (), 0,
                        (28, 28, 1))
  assert pool.images.shape == (8, 28, 28, 1) and pool.provenance[0]["split"] == "files"
  assert 0 <= pool.images.min() and pool.images.max() <= 1
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match="holds no images"):
    pool_lib.build(pool_lib.PoolConfig(sources=(f"folder:{tmp_path / 'empty'}",)), (), 0,
                   (28, 28, 1))


def test_an_index_pool_is_probed_stored_and_searched(tiny_proxy, tiny_zoo, tmp_path):
  zoo = tiny_zoo[0]
  extra = pool_lib.build(pool_lib.PoolConfig(sources=("fashion_mnist",), per_source=60), (), 0,
                         (28, 28, 1))
  groups = groups_from_zoo(zoo)
  ids = [m for g in groups for m in g.model_ids]
  index = tiny_proxy.build_index(groups[:1], zoo_metadata(zoo), pool=extra)
  n = len(tiny_proxy.pool) + 60
  assert index.classes["pool_labels"].shape == (groups[0].num_models, n)
  # Every row was probed on the proxy's pool followed by the index's: the anchor pass labels
  # each of those images exactly as the black box does.
  want = np.argmax(np.asarray(groups[0](np.concatenate([tiny_proxy.pool, extra.images]))), -1)
  np.testing.assert_array_equal(index.classes["pool_labels"], want)
  # Rows added later are probed on the same images; the proxy records itself in the index.
  index = tiny_proxy.build_index(groups[1:], zoo_metadata(zoo), index=index)
  assert index.ids == ids and index.classes["pool_labels"].shape[1] == n
  assert index.proxies[tiny_proxy.fingerprint]["pool"][0]["split"] == "test"
  with pytest.raises(IndexStoreError, match="set while it is empty"):
    index.set_pool(extra.images)
  index.save(tmp_path / "idx")
  back = ModelIndex.load(tmp_path / "idx")
  np.testing.assert_array_equal(back.pool, extra.images)
  assert back.pool_provenance[0]["source"] == "fashion_mnist" and back.proxies == index.proxies
  r = zoo.record(ids[0])
  x, y = few_shot(load_source(r.source), r.task, 5, seed=3)
  found = tiny_proxy.search(back, [(x, y)], k=3)
  assert found.ids[0][0] in {m for m in ids if zoo.record(m).task == r.task}
  # A query's classes are located in both pools: stand-ins may be the index's images.
  _, classes = tiny_proxy.describe_queries([(x, y)], index=back)
  assert classes.anchors.max() < n
  # The index's rows and the proxy's plain index are not interchangeable.
  plain = tiny_proxy.build_index(groups[:1])
  plain._pool = extra.images  # as if the pool had been attached to rows probed without it
  with pytest.raises(ProxyError, match="another proxy"):
    tiny_proxy.search(plain, [(x, y)], k=1)
  with pytest.raises(ProxyError, match="shape"):
    tiny_proxy.build_index(groups[:1], pool=np.zeros((3, 8, 8, 1), np.float32))


def test_cli_pool_options_and_provenance(tiny_proxy_dir, tiny_zoo_dir, tmp_path, capsys):
  from know2vec_jax.cli import main
  _write_images(tmp_path / "owner", 12)
  out = tmp_path / "index"
  assert main(["index", "build", "--proxy", str(tiny_proxy_dir), "--zoo", str(tiny_zoo_dir),
               "--out", str(out), "--pool", f"folder:{tmp_path / 'owner'}", "--quiet",
               "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["index_pool"][0]["images"] == 12 and info["index_pool"][0]["split"] == "files"
  (fp, prov), = info["built_by"].items()
  assert prov["pool"][0]["split"] == "test" and prov["backbone"]["labelled"]
  assert main(["index", "info", "--index", str(out)]) == 0
  text = capsys.readouterr().out
  assert "probe pool" in text and "index's own pool: folder:" in text
  assert main(["query", "--proxy", str(tiny_proxy_dir), "--index", str(out), "--task",
               "digits:0,1,2,3", "--json"]) == 0
  res = json.loads(capsys.readouterr().out)
  assert res["proxy"]["fingerprint"] == fp and res["index_pool"][0]["images"] == 12
  assert main(["index", "build", "--proxy", str(tiny_proxy_dir), "--zoo", str(tiny_zoo_dir),
               "--out", str(tmp_path / "bad"), "--pool", "digits@val"]) == 2
  assert "unknown split 'val'" in capsys.readouterr().err
