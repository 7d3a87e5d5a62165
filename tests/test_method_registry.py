"""The method registry (models/methods/registry.py): a method defined in one place trains,
evaluates and exports through the whole command line, and the registry refuses specs that
would clash."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import opqn_main
from conftest import TINY_SYNTHFACE
from models.methods import QuantHead, code_dtype, get_method, method_names
from models.methods.registry import MethodSpec, param, register, unregister
from utils.checkpoints import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread", "no_debug")


# ------------------------------------------------------------ a toy method, in one place
class ToyHead(QuantHead):
    """Learned codewords ``W`` (M, d, K); codes by the largest inner product, and the query
    table holds the inner products themselves, so faiss's IP IndexPQ scores like ADC."""

    method = "toy"
    faiss_metric = "ip"

    def __init__(self, feature_dim: int, num_books: int, num_words: int,
                 temperature: float) -> None:
        super().__init__(feature_dim, num_books, num_words)
        self.temperature = temperature
        self.words = nn.Parameter(torch.randn(num_books, self.word_dim, num_words) * 0.1)

    def products(self, features: Tensor) -> Tensor:
        return torch.einsum("bmd,mdk->bmk", self.split(features), self.words)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        probs = torch.softmax(self.products(features) / self.temperature, dim=-1)
        soft = torch.einsum("mdk,bmk->bmd", self.words, probs).flatten(1)
        return features, soft

    @torch.no_grad()
    def encode(self, features: Tensor) -> Tensor:
        return self.products(features.float()).argmax(-1).to(code_dtype(self.num_words))

    @torch.no_grad()
    def query_tables(self, features: Tensor) -> Tensor:
        return self.products(features.float())

    def faiss_centroids(self) -> Tensor:
        return self.words.detach()

    @torch.no_grad()
    def faiss_queries(self, features: Tensor) -> Tensor:
        return features.float()


class ToyLoss(nn.Module):
    """Cross-entropy of one linear classifier on the features and on their soft codes."""

    PARTS = ("ce", "ce_soft")

    def __init__(self, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        self.classifier = nn.Linear(feature_dim, num_classes)

    def chance_levels(self) -> dict[str, float]:
        return {"ce": math.log(self.classifier.out_features)}

    def forward(self, features: Tensor, soft: Tensor,
                labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ce = F.cross_entropy(self.classifier(features.float()), labels)
        ce_soft = F.cross_entropy(self.classifier(soft.float()), labels)
        return ce + ce_soft, {"ce": ce.detach(), "ce_soft": ce_soft.detach()}


@dataclasses.dataclass(frozen=True)
class ToyParams:
    toy_temperature: float = param(1.0, "softmax temperature of the soft codes (1)")


TOY = MethodSpec(
    name="toy", title="Toy", summary="a test's method",
    build_head=lambda c: ToyHead(c.feature_dim, c.num_books, c.num_words,
                                 c.params.toy_temperature),
    build_loss=lambda c: ToyLoss(c.num_classes, c.feature_dim),
    params=ToyParams, optimizer="adam")


@pytest.fixture
def toy():
    register(TOY)
    try:
        yield TOY
    finally:
        unregister("toy")


def test_a_method_registered_in_one_place_trains_evaluates_and_exports(toy, tiny_data_dir,
                                                                       tmp_path, run_cli):
    common = ["--dataset", "synthface", *TINY_SYNTHFACE, "--data-dir", str(tiny_data_dir),
              "--workers", "0", "--bs", "12", "--no-progress", "--device", "cpu",
              "--amp", "off"]
    assert run_cli(*common, "--method", "toy", "--toy-temperature", "0.5",
                 "--len", "12", "--num", "2", "--epochs", "2", "--eval-every", "0",
                 "--save", "toy.tar") == 0
    checkpoint = load_checkpoint(tmp_path / "checkpoint" / "toy.tar")
    assert checkpoint["config"]["method"] == "toy"
    assert checkpoint["config"]["toy_temperature"] == 0.5
    assert checkpoint["train_settings"]["optimizer"] == "adam"  # the spec's, not sgd
    trained = json.loads((tmp_path / "results" / "toy.json").read_text())
    assert trained["method"] == "toy" and trained["mAP"] is not None

    assert run_cli(*common, "-e", "--load", "toy.tar",
                 "--export-faiss", "toy.index") == 0
    evaluated = json.loads((tmp_path / "results" / "toy_on_synthface.json").read_text())
    assert evaluated["mAP"] == pytest.approx(trained["mAP"])
    assert (tmp_path / "results" / "toy.index").stat().st_size > 0
    from utils.cli.reporting import curve_label

    assert curve_label(trained, "toy").startswith("toy: Toy 12-bit (2x64)")  # its title
    assert "--toy-temperature" in opqn_main.build_parser().format_help()


def test_the_method_leaves_with_its_flags(toy):
    assert "toy" in method_names()
    unregister("toy")
    assert "toy" not in method_names()
    assert "--toy-temperature" not in opqn_main.build_parser().format_help()
    with pytest.raises(ValueError, match="unknown method 'toy'"):
        get_method("toy")


def test_the_registry_refuses_clashes():
    with pytest.raises(ValueError, match="already registered"):
        register(dataclasses.replace(get_method("opqn")))
    clash = dataclasses.replace(TOY, name="toy2", params=get_method("dpq").params)
    with pytest.raises(ValueError, match="belong to 'dpq'"):
        register(clash)
    with pytest.raises(ValueError, match="bf16 must be one of"):
        dataclasses.replace(TOY, bf16="fp8")
    with pytest.raises(ValueError, match="legacy defaults of unknown parameters"):
        dataclasses.replace(TOY, legacy_defaults={"nothing": 1})


def test_every_method_is_one_module_and_only_the_registry_lists_them():
    """A method's name is written in its own module only: no other project file holds a
    list of method names (tests, docs and the registry's default apart)."""
    import re
    import subprocess

    from conftest import REPO

    names = method_names()
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for name in names:
        module = f"models/methods/{name}.py"
        assert module in tracked, module
        quoted = re.compile(rf"[\"']{name}[\"']")
        # The logger is named after the project, not the method.
        holders = sorted(path for path in tracked
                         if not path.startswith(("tests/", "bench/"))
                         and any(quoted.search(line) and "getLogger" not in line
                                 and "LOGGER_NAME" not in line
                                 for line in (REPO / path).read_text(encoding="utf-8")
                                 .splitlines()))
        allowed = {module} | ({"models/methods/registry.py"} if name == "opqn" else set())
        assert set(holders) <= allowed, (name, holders)
