"""Flickr30k retrieval: recalls on a hand-ranked matrix, the Karpathy and LAVIS loaders, and
evaluate's ITC ranking + ITM re-ranking with fake embeddings."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tasks import flickr_retrieval as fr
from tasks.base import DataError, DataMissing

# 4 images x 8 texts, two captions per image: texts 2i and 2i+1 belong to image i.
IMG2TXT = [[0, 1], [2, 3], [4, 5], [6, 7]]
TXT2IMG = [0, 0, 1, 1, 2, 2, 3, 3]
SIM = np.array([
    # t0   t1   t2   t3   t4   t5   t6   t7
    [0.9, 0.1, 0.5, 0.2, 0.3, 0.0, 0.4, 0.6],  # img0: best own t0 0.9, no wrong text above: rank 0
    [0.8, 0.7, 0.6, 0.1, 0.2, 0.3, 0.4, 0.5],  # img1: best own t2 0.6, t0 and t1 above: rank 2
    [0.9, 0.8, 0.7, 0.6, 0.1, 0.0, 0.5, 0.4],  # img2: best own t4 0.1, six wrong above: rank 6
    [0.2, 0.3, 0.1, 0.4, 0.5, 0.6, 0.7, 0.0],  # img3: best own t6 0.7: rank 0
])
# Image->text ranks 0, 2, 6, 0: R@1 2/4, R@5 3/4, R@10 4/4.
# Text->image, per column (ties count against the model):
#   t0 own 0.9, img2 ties at 0.9 -> 1     t1 own 0.1, three above -> 3
#   t2 own 0.6, img2 0.7 above -> 1       t3 own 0.1 -> 3      t4 own 0.1 -> 3
#   t5 own 0.0, img0 ties, img1/img3 above -> 3   t6 own 0.7 -> 0   t7 own 0.0 -> 3
# R@1 1/8; R@5 and R@10 8/8 (4 images: every rank is below 4).
EXPECTED = {"txt_r1": 50.0, "txt_r5": 75.0, "txt_r10": 100.0, "txt_r_mean": 75.0,
            "img_r1": 12.5, "img_r5": 100.0, "img_r10": 100.0, "img_r_mean": 212.5 / 3}
EXPECTED["r_mean"] = (75.0 + 212.5 / 3) / 2


def test_recalls_on_a_hand_ranked_matrix():
    assert fr.retrieval_recalls(SIM, TXT2IMG, IMG2TXT) == pytest.approx(EXPECTED)
    assert fr.retrieval_recalls(torch.tensor(SIM), TXT2IMG, IMG2TXT) == pytest.approx(EXPECTED)


def test_a_separate_text_to_image_matrix_drives_only_img_recalls():
    perfect = np.array([[1.0 if TXT2IMG[t] == i else 0.0 for t in range(8)] for i in range(4)])
    metrics = fr.retrieval_recalls(SIM, TXT2IMG, IMG2TXT, sim_t2i=perfect)
    assert metrics["txt_r1"] == 50.0 and metrics["img_r1"] == 100.0 and metrics["img_r_mean"] == 100.0


def test_perfect_diagonal_gives_all_100():
    eye = torch.eye(5)  # one caption per image
    metrics = fr.retrieval_recalls(eye, list(range(5)), [[i] for i in range(5)])
    assert metrics == {key: 100.0 for key in EXPECTED}


def test_constant_or_nan_scores_are_misses():
    # Ties and NaN count against the model: a collapsed model must not look perfect.
    for scores in (np.zeros((4, 8)), np.full((4, 8), np.nan)):
        metrics = fr.retrieval_recalls(scores, TXT2IMG, IMG2TXT)
        assert metrics["txt_r1"] == 0.0 and metrics["img_r1"] == 0.0


def test_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"n_images x n_texts = \(4, 8\)"):
        fr.retrieval_recalls(SIM.T, TXT2IMG, IMG2TXT)


# -- loaders -----------------------------------------------------------------------------------
def save_image(root, name, shade):
    path = root / "flickr30k-images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 6), (shade, 0, 0)).save(path, "JPEG" if name.endswith(".jpg") else "PNG")


def write_karpathy(root, n_test=3):
    entries = []
    for i in range(n_test + 1):
        name = f"{1000 + i}.jpg"
        save_image(root, name, 60 * i)
        entries.append({"filename": name, "split": "test" if i < n_test else "train", "imgid": i,
                        "sentences": [{"raw": f"image {i} caption {k}"} for k in range(2)]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": entries, "dataset": "flickr30k"}))


def write_lavis(root):
    save_image(root, "a.png", 10)
    save_image(root, "b.png", 20)
    records = [{"image": "flickr30k-images/a.png", "caption": ["a one", "a two", "a three"]},
               {"image": "flickr30k-images/b.png", "caption": ["b one"]}]
    (root / "flickr30k_test.json").write_text(json.dumps(records))


def test_karpathy_split_flattens_texts(tmp_path):
    write_karpathy(tmp_path)
    data = fr.load_official(tmp_path, "test")
    assert [image.image_id for image in data.images] == ["1000.jpg", "1001.jpg", "1002.jpg"]
    assert data.texts[2:4] == ["image 1 caption 0", "image 1 caption 1"]
    assert data.txt2img == [0, 0, 1, 1, 2, 2]
    assert data.img2txt == [[0, 1], [2, 3], [4, 5]]
    assert data[1].image().size == (6, 6)


def test_lavis_file_and_karpathy_preference(tmp_path):
    write_lavis(tmp_path)
    data = fr.load_official(tmp_path, "test")
    assert data.img2txt == [[0, 1, 2], [3]] and data.texts[3] == "b one"
    assert data.images[0].image_source == str(tmp_path / "flickr30k-images" / "a.png")
    assert data.images[1].image().getpixel((0, 0)) == (20, 0, 0)
    write_karpathy(tmp_path)
    assert len(fr.load_official(tmp_path, "test")) == 3  # Karpathy wins when both exist


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(DataMissing, match=r"dataset_flickr30k.json or .*flickr30k_test.json"):
        fr.load_official(tmp_path, "test")
    write_lavis(tmp_path)
    path = tmp_path / "flickr30k_test.json"
    records = json.loads(path.read_text())
    del records[1]["caption"]
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=r"flickr30k_test.json\[1\]: missing field\(s\) caption"):
        fr.load_official(tmp_path, "test")
    path.write_text(json.dumps({"annotations": []}))
    with pytest.raises(DataError, match="expected a list"):
        fr.load_official(tmp_path, "test")
    write_karpathy(tmp_path)
    karpathy = tmp_path / "dataset_flickr30k.json"
    data = json.loads(karpathy.read_text())
    del data["images"][2]["sentences"]
    karpathy.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"dataset_flickr30k.json: images\[2\]: missing field\(s\) sentences"):
        fr.load_official(tmp_path, "test")


def test_corrupt_image_and_hf(tmp_path):
    write_lavis(tmp_path)
    (tmp_path / "flickr30k-images" / "b.png").write_bytes(b"\x89PNG broken")
    data = fr.load_official(tmp_path, "test")
    with pytest.raises(DataError, match="b.png: unreadable image"):
        data.images[1].image()
    with pytest.raises(DataMissing, match="no maintained HF schema"):
        fr.load_hf("nlphuji/flickr30k", "test")


# -- evaluate ----------------------------------------------------------------------------------
class FakeRetriever:
    """Image i (red channel 60 i) and "image i caption k" share the one-hot embedding e_i, so ITC
    ranks the right pairs first. A second query points nowhere in particular (1/sqrt(d) with every
    text). ITM either agrees with ITC or, reversed, prefers every wrong pair by a wide margin."""

    def __init__(self, n, reverse_itm=False):
        self.n, self.reverse_itm, self.itm_pairs = n, reverse_itm, 0

    def image_embeddings(self, images):
        own = torch.eye(self.n)[[round(image.getpixel((0, 0))[0] / 60) for image in images]]  # JPEG: ~60 i
        flat = torch.full_like(own, self.n ** -0.5)
        return torch.stack([own, flat], dim=1)

    def text_embeddings(self, texts):
        return torch.eye(self.n)[[int(text.split()[1]) for text in texts]]

    def itm_scores(self, images, texts):
        self.itm_pairs += len(texts)
        match = (self.image_embeddings(images)[:, 0] * self.text_embeddings(texts)).sum(dim=1)
        return -10.0 * match + 10.0 * (1 - match) if self.reverse_itm else match


def test_evaluate_with_aligned_embeddings_is_perfect(tmp_path):
    write_karpathy(tmp_path)
    data = fr.load_official(tmp_path, "test")
    result = fr.evaluate(FakeRetriever(3), data, batch_size=2, progress=False)
    assert result.metrics == {key: 100.0 for key in EXPECTED}
    assert (result.primary_metric, result.n_samples) == ("r_mean", 3)
    assert [entry["rank"] for entry in result.samples] == [1] * 9  # 3 images, then 6 texts
    assert result.samples[3] == {"direction": "text->image", "image_id": "1000.jpg",
                                 "text": "image 0 caption 0", "rank": 1}


def test_reversed_itm_hurts_only_the_reranked_candidates(tmp_path):
    write_karpathy(tmp_path)
    data = fr.load_official(tmp_path, "test")  # 3 images x 6 texts
    # k_test=1: each image's single re-ranked text and each text's single re-ranked image are
    # right (ITC put them first); -inf elsewhere, so ITM cannot demote them. 3 + 6 pairs at most.
    adapter = FakeRetriever(3, reverse_itm=True)
    assert fr.evaluate(adapter, data, k_test=1, progress=False).primary == 100.0
    assert adapter.itm_pairs == 6  # the image->text picks are among the text->image picks
    # k_test=2: the two captions of an image are its top 2 texts (both get ITM -10, nothing else
    # is re-ranked): image->text stays perfect. A text's top 2 images add one wrong image that
    # ITM lifts above its own: every text at rank 2.
    metrics = fr.evaluate(FakeRetriever(3, True), data, k_test=2, progress=False).metrics
    assert metrics["txt_r_mean"] == 100.0
    assert (metrics["img_r1"], metrics["img_r5"]) == (0.0, 100.0)
    # k_test >= every candidate count: all pairs re-ranked, the four wrong texts of an image
    # (and the two wrong images of a text) outrank the right ones.
    metrics = fr.evaluate(FakeRetriever(3, True), data, k_test=128, progress=False).metrics
    assert (metrics["txt_r1"], metrics["txt_r5"], metrics["img_r1"], metrics["img_r5"]) == (0, 100, 0, 100)


def test_subsets_keep_whole_images(tmp_path):
    write_karpathy(tmp_path)
    data = fr.load_official(tmp_path, "test")
    part = fr.subset(data, 2, seed=0)
    assert part.img2txt == [[0, 1], [2, 3]] and part.txt2img == [0, 0, 1, 1]
    assert [i.image_id for i in part.images] == [i.image_id for i in fr.subset(data, 2, seed=0).images]
    assert fr.subset(data, 5, seed=0) is data
    # A plain list of images (e.g. [data[i] for i in keep]) is accepted too.
    result = fr.evaluate(FakeRetriever(3), [data[0], data[2]], progress=False)
    assert result.n_samples == 2 and len(result.samples) == 2 + 4


# -- the shared image side on the tiny BLIP-2 retrieval checkpoint ------------------------------
TINY_RETRIEVAL = "fixtures/tiny/blip2-tiny-retrieval"
# The default grid's quantized-component combinations for the retrieval model, the vision tower
# FP or quantized: FP, and RTN W4 of the vision tower alone, of the Q-Former alone, of both.
COMPONENT_BITS = {"fp": None, "vision": {"vision": 4}, "qformer": {"qformer": 4}, "all": {"vision": 4, "qformer": 4}}


class PerPairOnly:
    """The adapter without the shared image side: evaluate falls back to itm_scores per pair."""

    def __init__(self, adapter):
        self.image_embeddings, self.text_embeddings = adapter.image_embeddings, adapter.text_embeddings
        self.itm_scores = adapter.itm_scores


@pytest.fixture(scope="module")
def flickr_world(tmp_path_factory):
    from fixtures.world.generate import ensure_world
    root = ensure_world(tmp_path_factory.mktemp("world") / "world", layout={"flickr30k": {"test": 24}})
    return fr.load_official(root / "flickr30k", "test")   # 24 images x 5 captions


@pytest.mark.parametrize("components", COMPONENT_BITS)
def test_shared_image_side_scores_equal_the_per_pair_path(components, flickr_world):
    """Bit for bit in fp32 on CPU: the features path runs the forward's own ops on the same
    inputs, only batched across images (pairs of several images share a Q-Former batch)."""
    from fixtures.adapters.blip2 import Blip2RetrievalAdapter
    from quantizers.api import quantize
    from quantizers.config import make_config
    adapter = Blip2RetrievalAdapter.load("r", TINY_RETRIEVAL, torch.device("cpu"), "float32")
    if COMPONENT_BITS[components]:
        quantize(adapter, make_config(f"rtn-w4-{components}", "rtn", COMPONENT_BITS[components]))
    assert fr.shares_image_side(adapter) and not fr.shares_image_side(PerPairOnly(adapter))
    data, k_test = flickr_world, 16
    bar = fr.tqdm(disable=True)
    # The ITM scores of every pair the evaluation re-ranks, both ways; pair batches of 7 cross
    # image boundaries and mix texts of different lengths. The per-pair path scores each image's
    # candidates (up to all 120 texts) in one call: MKL rounds a GEMM over a handful of rows (an ITM
    # head call on 1 or 2 pairs) differently in the last bit, whichever path makes it.
    itc = fr._itc(adapter, data, 8, bar)
    features = fr._image_side(adapter, data, 8)
    assert torch.equal(fr._itc_from_features(adapter, features, data, 8, bar), itc)
    pairs = torch.zeros_like(itc, dtype=torch.bool)
    pairs.scatter_(1, itc.topk(k_test, dim=1).indices, True)
    pairs.scatter_(0, itc.topk(k_test, dim=0).indices, True)
    per_pair = fr._itm(adapter, data, pairs, len(data.texts), bar)   # one call per image
    shared = fr._itm_from_features(adapter, features, data, pairs, 8, bar, pair_batch_size=7)
    assert torch.equal(shared.isnan(), ~pairs)
    assert torch.equal(shared[pairs], per_pair[pairs])
    # And the whole evaluation: the same recalls and per-sample ranks.
    new = fr.evaluate(adapter, data, k_test=k_test, batch_size=128, progress=False)
    old = fr.evaluate(PerPairOnly(adapter), data, k_test=k_test, batch_size=128, progress=False)
    assert new.metrics == old.metrics and new.samples == old.samples
    assert set(new.details) == {"seconds_image_side", "seconds_itc", "seconds_itm_pairs", "itm_pairs"}
    assert new.details["itm_pairs"] == int(pairs.sum())


def test_cross_attention_keys_and_values_run_once_per_image(flickr_world):
    """In a pair batch the Q-Former's cross-attention key/value Linears see each image's rows
    once, however many of its candidates the batch holds, and are back in place afterwards
    (also when scoring fails)."""
    from fixtures.adapters.blip2 import MIN_KV_GEMM_ROWS, Blip2RetrievalAdapter
    adapter = Blip2RetrievalAdapter.load("r", TINY_RETRIEVAL, torch.device("cpu"), "float32")
    data = flickr_world
    features = fr._image_side(adapter, data, 8)
    linears = [(layer.crossattention.attention, name) for layer in adapter.model.qformer.encoder.layer
               if layer.has_cross_attention for name in ("key", "value")]
    originals = [getattr(attention, name) for attention, name in linears]
    rows_seen = []
    hook = originals[0].register_forward_hook(lambda module, args, out: rows_seen.append(args[0].shape[0]))
    image_idx = [3, 3, 3, 3, 5, 5, 5, 9, 9, 9]   # 10 pairs of 3 images
    scores = adapter.itm_scores_from_features(features, image_idx, data.texts[:10])
    hook.remove()
    # 3 images (repeated up to the GEMM's minimum row count), not 10 pairs' rows.
    repeats = -(-MIN_KV_GEMM_ROWS // (3 * features.shape[1]))
    assert scores.shape == (10,) and rows_seen == [3 * repeats] and 3 * repeats < 10
    assert [getattr(attention, name) for attention, name in linears] == originals
    with pytest.raises(RuntimeError):
        adapter.itm_scores_from_features(features, image_idx, data.texts[:9])   # 9 texts for 10 pairs
    assert [getattr(attention, name) for attention, name in linears] == originals
