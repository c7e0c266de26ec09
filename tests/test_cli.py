"""The know2vec command on a stored tiny zoo."""

import json

import pytest

from know2vec_jax.cli import main


def test_data_list(capsys):
  assert main(["data", "list"]) == 0
  out = capsys.readouterr().out
  assert "fashion_mnist" in out and "folder:<path>" in out and "<source>+invert" in out
  assert main(["data", "list", "--json"]) == 0
  assert json.loads(capsys.readouterr().out) == out.split()


def test_data_show(capsys):
  assert main(["data", "show", "digits+invert", "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["train"] == 1258 and info["image_shape"] == [28, 28, 1]


def test_zoo_list_show_summary(tiny_zoo_dir, capsys):
  assert main(["zoo", "list", "--zoo", str(tiny_zoo_dir), "--json"]) == 0
  rows = json.loads(capsys.readouterr().out)
  assert len(rows) == 8
  mid = rows[0]["model_id"]
  assert main(["zoo", "show", mid, "--zoo", str(tiny_zoo_dir)]) == 0
  assert f"model_id: {mid}" in capsys.readouterr().out
  assert main(["zoo", "summary", "--zoo", str(tiny_zoo_dir)]) == 0
  out = capsys.readouterr().out
  assert "mean_acc" in out and "8 models in 3 stacks" in out


def test_user_errors_exit_2_with_one_line(tiny_zoo_dir, tmp_path, capsys):
  assert main(["zoo", "show", "nope", "--zoo", str(tiny_zoo_dir)]) == 2
  err = capsys.readouterr().err
  assert err.startswith("know2vec: error: unknown model id 'nope'") and "Traceback" not in err
  assert main(["zoo", "list", "--zoo", str(tmp_path / "none")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert main(["data", "show", "mnist5k+sepia"]) == 2
  assert "unknown transform" in capsys.readouterr().err


def _one_line_error(capsys, *fragments):
  """The command printed exactly one stderr line, ``know2vec: error: ...``, holding fragments."""
  err = capsys.readouterr().err.strip()
  assert err.startswith("know2vec: error: ") and "\n" not in err and "Traceback" not in err, err
  for f in fragments:
    assert f in err, (f, err)
  return err


def _image_folder(root, source="digits", classes=(0, 3, 5), per_class=4, split="test",
                  noise=False):
  """A folder of PNGs, one sub-folder per class, from a source's split (or of uniform noise)."""
  import numpy as np
  from PIL import Image
  from know2vec_jax.data import load_source
  data = load_source(source)
  images, labels = data.split(split)
  rng = np.random.default_rng(0)
  for c in classes:
    d = root / f"class_{data.class_names[c]}"
    d.mkdir(parents=True)
    for j, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
      pixels = rng.random(images.shape[1:3]) if noise else images[i, ..., 0]
      Image.fromarray((pixels * 255).round().astype(np.uint8)).save(d / f"{j}.png")
  return root


def test_data_grid_writes_a_png(tmp_path, capsys):
  import numpy as np
  from PIL import Image
  out = tmp_path / "sub" / "grid.png"
  assert main(["data", "grid", "digits+invert", "--classes", "0,1,2,3", "--out", str(out),
               "--per-class", "5", "--scale", "2", "--json"]) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["classes"] == ["0", "1", "2", "3"] and info["per_class"] == 5
  with Image.open(out) as im:
    assert im.format == "PNG" and list(im.size) == info["size"]
    pix = np.asarray(im.convert("L"), np.float32)
  assert pix.shape[0] == 4 * (2 * 28 + 2) and pix.std() > 10  # four rows of real images
  assert main(["data", "grid", "digits", "--classes", "0,seven", "--out", str(out)]) == 2
  _one_line_error(capsys, "unknown class 'seven'")


def test_train_index_query_commands(tiny_zoo_dir, tmp_path, capsys):
  """The whole command-line workflow on the tiny zoo, with a proxy trained by `know2vec train`."""
  zoo, proxy, index = str(tiny_zoo_dir), str(tmp_path / "proxy"), str(tmp_path / "index")
  fast = ["--set", "align.steps=20", "--set", "episodes=2"]
  assert main(["train", "--zoo", zoo, "--out", proxy, "--preset", "tiny", "--quiet", "--json"]
              + fast) == 0
  info = json.loads(capsys.readouterr().out)
  assert info["num_models"] == 8 and info["embed_dim"] == 32 and info["path"] == proxy
  assert info["overrides"] == ["align.steps=20", "episodes=2"]
  assert info["align_final"]["step"] == 20
  assert main(["train", "--zoo", zoo, "--out", proxy, "--preset", "tiny", "--quiet"]) == 2
  _one_line_error(capsys, "already exists", "--force")

  assert main(["zoo", "list", "--zoo", zoo, "--json"]) == 0
  ids = [m["model_id"] for m in json.loads(capsys.readouterr().out)]
  assert main(["index", "build", "--proxy", proxy, "--zoo", zoo, "--out", index, "--quiet",
               "--models", ",".join(ids[:5])]) == 0
  out = capsys.readouterr().out
  assert "added 5 model(s) (0 probed, 5 from the proxy's stored knowledge), 5 in all" in out
  assert main(["index", "add", "--proxy", proxy, "--zoo", zoo, "--index", index, "--quiet",
               "--models", ids[4]]) == 2
  _one_line_error(capsys, "already in the index", repr(ids[4]))
  assert main(["index", "add", "--proxy", proxy, "--zoo", zoo, "--index", index, "--quiet",
               "--skip-existing", "--json"]) == 0
  assert sorted(json.loads(capsys.readouterr().out)["added"]) == sorted(ids[5:])
  assert main(["index", "info", "--index", index, "--json", "--ids"]) == 0
  summary = json.loads(capsys.readouterr().out)
  assert summary["models"] == 8 and summary["dim"] == 32 and summary["tasks"] == 4
  assert sorted(summary["ids"]) == sorted(ids) and summary["proxies"] == [info["fingerprint"]]
  assert set(summary["built_by"]) == {info["fingerprint"]} and summary["index_pool"] == []

  assert main(["query", "--proxy", proxy, "--index", index, "--task", "digits:3,4,5,8", "-k",
               "4", "--columns", "heldout_accuracy,role"]) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith("query: digits/3-4-5-8 (3, 4, 5, 8), 20 images; top 4 of 8 models")
  assert out[1].split() == ["rank", "model_id", "arch", "task", "score", "agreement", "token",
                            "vector", "heldout_accuracy", "role"] and len(out) == 8
  assert out[-1].startswith("fit ")  # a task of the zoo: no NO FIT flag
  noise = _image_folder(tmp_path / "noise", noise=True)
  assert main(["query", "--proxy", proxy, "--index", index, "--images", str(noise)]) == 0
  assert capsys.readouterr().out.splitlines()[-1].startswith("NO FIT: ")
  assert main(["query", "--proxy", proxy, "--index", index, "--images", str(noise), "--json",
               "--set", "match.vector_weight=0"]) == 0
  res = json.loads(capsys.readouterr().out)
  assert res["no_fit"] is True and res["fit"] < res["fit_threshold"]
  assert all(r["score"] == pytest.approx(r["agreement"] + 0.25 * r["token"], abs=1e-5)
             for r in res["results"])
  folder = _image_folder(tmp_path / "mine")
  assert main(["query", "--proxy", proxy, "--index", index, "--images", str(folder), "--json"]
              ) == 0
  res = json.loads(capsys.readouterr().out)
  assert res["query"]["classes"] == ["class_0", "class_3", "class_5"]
  assert res["query"]["num_images"] == 12 and len(res["results"]) == 8
  assert [r["rank"] for r in res["results"]] == list(range(1, 9))

  # --models takes globs, families and files of ids; one that matches nothing is one line.
  from know2vec_jax.cli import select_models
  from know2vec_jax.zoo import ZooError, load_zoo
  z = load_zoo(zoo)
  (tmp_path / "ids.txt").write_text(f"{ids[0]}\n\n{ids[1]}\n")
  assert select_models(z, "*.digits+invert.*") == [m for m in z.records if "+invert" in m]
  assert select_models(z, "mlp") == [m for m in z.records if z.record(m).arch == "mlp"]
  assert select_models(z, f"{tmp_path / 'ids.txt'},cnn_s") == [
      m for m in z.records if m in ids[:2] or z.record(m).arch == "cnn_s"]
  with pytest.raises(ZooError, match="matches no model"):
    select_models(z, "*.fashion*")
  assert main(["index", "build", "--proxy", proxy, "--zoo", zoo, "--out", str(tmp_path / "i2"),
               "--models", "*.digits.*", "--quiet", "--json"]) == 0
  assert all(".digits." in m for m in json.loads(capsys.readouterr().out)["added"])

  assert main(["index", "remove", "--index", index, ids[0], ids[1]]) == 0
  assert "now holds 6" in capsys.readouterr().out
  assert main(["index", "remove", "--index", index, ids[0]]) == 2
  _one_line_error(capsys, f"unknown model id {ids[0]!r}")


def test_every_command_has_help(capsys):
  from know2vec_jax.cli import build_parser
  parser = build_parser()
  commands = [[]]
  sub = next(a for a in parser._actions if a.dest == "command")
  for name, p in sub.choices.items():
    nested = [a for a in p._actions if a.dest == "action"]
    commands += [[name, a] for a in nested[0].choices] if nested else [[name]]
  assert {c[0] for c in commands if c} == {"data", "zoo", "train", "index", "query", "select",
                                           "eval", "bench"}
  for cmd in commands:
    try:
      code = main(cmd + ["--help"])  # `bench` forwards --help and returns its status
    except SystemExit as e:
      code = e.code
    assert code == 0
    text = capsys.readouterr().out
    assert "usage:" in text and len(text) > 100, cmd
  assert main(["eval", "nnr", "--help"]) == 0  # forwarded to experiments.nnr
  assert "--quick" in capsys.readouterr().out


def test_eval_and_bench_forward_or_say_why(capsys, monkeypatch, tmp_path):
  import sys
  calls = []
  fake = type(sys)("benchmarks.__main__")
  fake.main = lambda argv: calls.append(argv) or 0
  monkeypatch.setitem(sys.modules, "benchmarks.__main__", fake)
  assert main(["bench", "--quick", "--only", "zoo_train"]) == 0
  assert calls == [["--quick", "--only", "zoo_train"]]
  for exp in ("nnr", "sfmte", "generalise"):  # a missing zoo is one line too
    assert main(["eval", exp, "--zoo", str(tmp_path / "nozoo")]) == 2
    _one_line_error(capsys, "no zoo at", "know2vec zoo build")
  assert main(["eval", "sfmte", "--set", "capacity.train_targets=0"]) == 2
  assert "train_targets must be at least 4, got 0" in capsys.readouterr().err
  # An experiment's unknown key or bad value fails before any work (no zoo is even read).
  assert main(["eval", "nnr", "--zoo", str(tmp_path / "nozoo"), "--set",
               "proxy.align.stepz=3"]) == 2
  err = capsys.readouterr().err
  assert "unknown config key 'proxy.align.stepz'; valid keys: proxy.align.steps" in err
  assert "no zoo" not in err
  assert main(["eval", "leep"]) == 2
  _one_line_error(capsys, "invalid choice: 'leep'")


def test_command_line_mistakes_are_one_line(tiny_zoo_dir, tiny_proxy_dir, tiny_index, tmp_path,
                                            capsys):
  zoo, proxy = str(tiny_zoo_dir), str(tiny_proxy_dir)
  index = str(tiny_index.save(tmp_path / "index"))
  cases = [
      (["train", "--zoo", zoo, "--out", str(tmp_path / "p"), "--set", "align.stepz=3"],
       ["unknown config key 'align.stepz'"]),
      (["train", "--zoo", zoo, "--out", str(tmp_path / "p"), "--set", "align.steps=many"],
       ["bad value 'many' for align.steps"]),
      (["train", "--zoo", zoo, "--out", str(tmp_path / "p"), "--set", "backbone.steps=0"],
       ["bad value for backbone.steps: backbone steps must be >= 1"]),
      (["train", "--zoo", zoo, "--out", str(tmp_path / "p"), "--set", "match.fit_threshold=0.5"],
       ["match.fit_threshold is fitted by training", "know2vec query --set"]),
      (["query", "--proxy", proxy, "--index", index, "--task", "digits:0,1", "--set",
        "match.fit_threshold=much"], ["bad value 'much' for fit_threshold"]),
      (["train", "--zoo", str(tmp_path / "nozoo"), "--out", str(tmp_path / "p")],
       ["no zoo at", "does not exist"]),
      (["index", "build", "--proxy", str(tmp_path / "noproxy"), "--zoo", zoo, "--out",
        str(tmp_path / "i")], ["no proxy at", "know2vec train"]),
      (["index", "add", "--proxy", proxy, "--zoo", zoo, "--index", index, "--models", "nope"],
       ["--models item 'nope' matches no model"]),
      (["index", "info", "--index", str(tmp_path / "noindex")], ["no index at"]),
      (["query", "--proxy", proxy, "--index", index, "--images", str(tmp_path / "none")],
       ["image folder", "does not exist"]),
      (["query", "--proxy", proxy, "--index", index, "--task", "digits"],
       ["--task must be SOURCE:class,class"]),
      (["query", "--proxy", proxy, "--index", index, "--task", "digits:0,1", "-k", "0"],
       ["-k must be >= 1"]),
      (["query", "--proxy", proxy, "--index", index, "--task", "digits:0,1", "--shots", "500"],
       ["fewer than shots=500"]),
      (["query", "--proxy", proxy, "--index", index], ["one of the arguments --images --task"]),
      (["nonsense"], ["invalid choice: 'nonsense'"]),
  ]
  for argv, fragments in cases:
    assert main(argv) == 2, argv
    _one_line_error(capsys, *fragments)
