"""The IVF index over a model's own codes (utils.retrieval.ivf_index), for every method's
head."""
import numpy as np
import pytest
import torch

faiss = pytest.importorskip("faiss")

from models.methods import build_head  # noqa: E402
from models.network import NetConfig  # noqa: E402
from utils.retrieval.faiss_index import (build_head_index, pack_bits, pack_codes,  # noqa: E402
                               save_faiss_index, search_head_index)
from utils.retrieval.ivf_index import (add_to_ivf, build_ivf_index, default_nlist,  # noqa: E402
                             merge_on_disk, read_ivf, set_nprobe, train_ivf)
from utils.retrieval.adc import search_adc  # noqa: E402

# method -> (M, K, D): small heads, each method's own constraints (opqn: K <= d; dcdh: L x 2).
HEADS = {"opqn": (4, 16, 64), "l2q": (4, 16, 32), "dpq": (4, 16, 32), "gpq": (4, 16, 32),
         "dcdh": (24, 2, 24)}
NLIST = 8
TOPK = 10


def _case(method, n=300, q=9, seed=0):
    m, k, d = HEADS[method]
    torch.manual_seed(seed)
    head = build_head(NetConfig(num_books=m, num_words=k, feature_dim=d, num_classes=4,
                                 method=method)).eval()
    # Clustered features, as a trained backbone gives: 12 centres plus noise.
    centres = torch.randn(12, d) * 2
    feats = centres[torch.randint(0, 12, (n,))] + 0.5 * torch.randn(n, d)
    queries = centres[torch.randint(0, 12, (q,))] + 0.5 * torch.randn(q, d)
    return head, head.encode(feats), queries


def _clone(index):
    return (faiss.clone_binary_index if isinstance(index, faiss.IndexBinary)
            else faiss.clone_index)(index)


def _exact(head, codes, queries, positions):
    """The ADC engine's score of each returned item (-1 positions excluded by the caller)."""
    tables = head.query_tables(queries)
    c = codes.long()[positions.clamp_min(0)]  # (Q, k, M)
    books = torch.arange(c.shape[2])
    return tables[torch.arange(tables.shape[0])[:, None, None], books, c].sum(-1)


@pytest.mark.parametrize("method", list(HEADS))
def test_all_lists_probed_gives_the_flat_scores(method):
    head, codes, queries = _case(method)
    ivf = build_ivf_index(head, codes, nlist=NLIST, nprobe=NLIST)
    assert ivf.ntotal == codes.shape[0] and ivf.nlist == NLIST and ivf.nprobe == NLIST
    assert isinstance(ivf, faiss.IndexBinaryIVF if method == "dcdh" else faiss.IndexIVFPQ)
    flat_scores, _ = search_adc(head.query_tables(queries), codes, TOPK)
    scores, positions = search_head_index(ivf, head, queries, TOPK)
    np.testing.assert_allclose(scores.numpy(), flat_scores.numpy(), atol=1e-5)
    faiss_flat, _ = search_head_index(build_head_index(head, codes), head, queries, TOPK)
    np.testing.assert_allclose(scores.numpy(), faiss_flat.numpy(), atol=1e-5)
    # Every returned score is the engine's score of the item returned.
    np.testing.assert_allclose(scores.numpy(), _exact(head, codes, queries, positions).numpy(),
                               atol=1e-5)

    # Fewer lists: still valid items with their exact scores, never better than the flat top.
    set_nprobe(ivf, 1)
    few, few_pos = search_head_index(ivf, head, queries, TOPK)
    ok = few_pos >= 0
    assert ok[:, 0].all()
    assert int(few_pos.max()) < codes.shape[0]
    exact = _exact(head, codes, queries, few_pos)
    assert torch.allclose(few[ok], exact[ok], atol=1e-5)
    assert bool((few[:, 0] <= flat_scores[:, 0] + 1e-5).all())


@pytest.mark.parametrize("method", ["opqn", "l2q", "dcdh"])
def test_lists_hold_the_models_codes_unchanged(method):
    from faiss.contrib.inspect_tools import get_invlist

    head, codes, _ = _case(method, n=200)
    ivf = build_ivf_index(head, codes, nlist=NLIST)
    binary = method == "dcdh"
    want = pack_bits(codes) if binary else pack_codes(codes, ivf.pq.nbits)
    seen = []
    for lst in range(ivf.nlist):
        ids, stored = get_invlist(ivf.invlists, lst)
        np.testing.assert_array_equal(stored.reshape(len(ids), -1), want[ids])
        seen += ids.tolist()
    assert sorted(seen) == list(range(codes.shape[0]))
    if not binary:
        # Item lists = the quantizer's routing of the item's reconstruction, as for a query.
        from utils.retrieval.ivf_index import reconstruct

        _, routed = ivf.quantizer.search(reconstruct(head, codes), 1)
        for lst in range(ivf.nlist):
            ids, _ = get_invlist(ivf.invlists, lst)
            assert (routed[ids, 0] == lst).all()
        # The PQ holds the head's codewords: decoding returns the reconstructions.
        cent = head.faiss_centroids().detach().permute(0, 2, 1)
        np.testing.assert_allclose(faiss.vector_to_array(ivf.pq.centroids),
                                   cent.reshape(-1).numpy(), atol=0)


@pytest.mark.parametrize("method", ["opqn", "dcdh"])
def test_shards_merged_on_disk_equal_one_index(method, tmp_path):
    head, codes, queries = _case(method)
    trained = train_ivf(head, codes, NLIST)
    cuts = [(0, 110), (110, 300)]
    files = []
    for i, (a, b) in enumerate(cuts):
        shard = _clone(trained)
        add_to_ivf(shard, head, codes[a:b], torch.arange(a, b))
        files.append(tmp_path / f"shard{i}.faiss")
        save_faiss_index(shard, files[-1])
    whole = _clone(trained)
    add_to_ivf(whole, head, codes)
    merged = merge_on_disk(trained, files, tmp_path / "lists.ivfdata")
    save_faiss_index(merged, tmp_path / "merged.faiss")
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("merged.faiss", "lists.ivfdata"):  # the lists are found beside the index
        (tmp_path / name).rename(moved / name)
    loaded = read_ivf(moved / "merged.faiss")
    assert "OnDisk" in type(faiss.downcast_InvertedLists(loaded.invlists)).__name__
    assert loaded.ntotal == codes.shape[0]
    for index in (whole, loaded):
        set_nprobe(index, 3)
    a = search_head_index(whole, head, queries, TOPK)
    b = search_head_index(loaded, head, queries, TOPK)
    assert torch.equal(a[0], b[0])


def test_default_nlist_and_bad_nlist():
    assert default_nlist(1) == 1 and default_nlist(36) == 1 and default_nlist(10 ** 6) == 1024
    assert default_nlist(1000) == 16  # sqrt(1000) rounds to 32, but 39 items per list
    assert default_nlist(10 ** 7) == 4096
    head, codes, _ = _case("opqn", n=20)
    with pytest.raises(ValueError, match="nlist 21"):
        train_ivf(head, codes, 21)


@pytest.mark.parametrize("method,spherical", [("opqn", False), ("opqn", True), ("gpq", False),
                                              ("l2q", False)])
def test_book_by_book_kmeans_is_lloyds_on_the_reconstructions(method, spherical):
    """One more iteration of utils.retrieval.ivf_index.kmeans_codes is one dense Lloyd step on the
    reconstructions from the centroids it returned (L2 assignment; spherical: inner product
    and unit-norm means)."""
    from utils.retrieval.ivf_index import _words, kmeans_codes, reconstruct

    head, codes, _ = _case(method, n=400)
    words = _words(head)
    nlist = 6
    before = kmeans_codes(words, codes, nlist, niter=3, seed=1, spherical=spherical).double()
    after = kmeans_codes(words, codes, nlist, niter=4, seed=1, spherical=spherical).double()
    points = torch.from_numpy(reconstruct(head, codes)).double()
    if spherical:
        assign = (points @ before.T).argmax(1)
    else:
        assign = torch.cdist(points, before).argmin(1)
    assert torch.bincount(assign, minlength=nlist).min() > 0  # no empty list to restart
    means = torch.stack([points[assign == j].mean(0) for j in range(nlist)])
    if spherical:
        means = means / means.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(after.numpy(), means.numpy(), atol=1e-5)
