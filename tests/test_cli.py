"""The know2vec command on a stored tiny zoo."""

import json

from know2vec_jax.cli import main


def test_data_list(capsys):
  assert main(["data", "list"]) == 0
  out = capsys.readouterr().out
  assert "fashion_mnist" in out and "folder:<path>" in out and "<source>+invert" in out


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
