"""data.py: loaders on the demo miniature, boxes, templates, the mixture, bad data, the demo itself."""
import glob
import hashlib
import json
import os
import pickle
import shutil
from collections import Counter, OrderedDict

import numpy as np
import pytest
import torch

import data
import metrics
from workshop.demo import DEMO_CLAIMS, demo_texts, make_demo, sincos_2d, write_tokenizer
from model import Tokenizer, build_prompt


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    make_demo(root, seed=0)
    return root


def copy_of(demo, tmp_path, *parts):
    """A data root holding only the named part of the demo (for the bad-data tests)."""
    root = tmp_path / "root"
    shutil.copytree(os.path.join(demo, *parts), root.joinpath(*parts))
    return str(root)


# -------------------------------------------------------------------------------------------------
# Every loader reads its miniature

SIZES = {"train": dict(medqa=48, pubmedqa=48, slake_vqa=600, path_vqa=480, mimic_cxr=360, medpix=320, slake_rec=400,
                       slake_reg=400, sa_med2d_rec=400, sa_med2d_reg=400, dermamnist=300, organsmnist=300),
         "test": dict(medqa=16, pubmedqa=16, slake_vqa=150, path_vqa=100, mimic_cxr=100, medpix=101, slake_rec=100,
                      slake_reg=100, sa_med2d_rec=100, sa_med2d_reg=100, dermamnist=102, organsmnist=102)}


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_loader_reads_the_demo(demo, split):
    sets = data.load_datasets(demo, split, train=False)
    assert {n: len(d) for n, d in sets.items()} == SIZES[split]  # Slake zh rows, MedPix non-captions dropped
    for name, ds in sets.items():
        for i in (0, len(ds) - 1):
            s = ds[i]
            assert s.dataset == name and s.task == data.TASK_OF[name]
            assert s.instruction.startswith(f"[{s.task}] ")
            assert s.answer and s.answer == data.process_text(s.answer)
            if s.task == "qa":
                assert s.image is None and s.image_size is None
            else:
                assert s.image.mode == "RGB" and s.image.size == s.image_size
            if s.task == "refer":
                grid = data.parse_box(s.answer)
                x, y, w, h = s.box
                W, H = s.image_size
                assert grid == (int(x / W * 100), int(y / H * 100), int((x + w) / W * 100), int((y + h) / H * 100))
            if s.task == "identify":
                assert data.parse_box(s.instruction.split("location ", 1)[1]) is not None
            if s.task == "vqa":
                assert s.answer_type in ("OPEN", "CLOSED")


def test_loaders_read_the_official_fields(demo):
    """Spot checks against the raw files, read here independently of the loaders."""
    sets = data.load_datasets(demo, "test", train=False)
    first = json.loads(open(os.path.join(demo, "MedQA/questions/US/test.jsonl")).readline())
    assert sets["medqa"][0].answer == first["answer"] and first["question"] in sets["medqa"][0].instruction
    qas = pickle.load(open(os.path.join(demo, "Path-VQA/qas/test_vqa.pkl"), "rb"))
    s = sets["path_vqa"][1]
    assert s.answer == list(qas[1]["label"])[0] and s.instruction.endswith(qas[1]["sent"])
    assert s.answer_type == ("CLOSED" if qas[1]["answer_type"] == "yes/no" else "OPEN")
    mimic = json.load(open(os.path.join(demo, "MIMIC_caption/annotation.json")))["test"]
    assert sets["mimic_cxr"][3].answer == mimic[3]["report"]
    (obj, box), = json.load(open(os.path.join(demo, "Slake-VQA/imgs/xmlab500/detection.json")))[1].items()
    s = sets["slake_rec"][1]
    assert s.instruction == f"[refer] give me the location of {obj}" and list(s.box) == box
    import numpy as np
    labels = np.load(os.path.join(demo, "MedMNIST/organsmnist_224.npz"))["test_labels"]
    names = ["bladder", "left femur", "right femur", "heart", "left kidney", "right kidney", "liver"]  # spec 7
    assert [sets["organsmnist"][i].answer for i in range(3)] == [names[int(v)] for v in labels[:3, 0]]
    assert sets["dermamnist"][0].image.size == (64, 64)  # the loader does not assume 224


def test_training_view_joins_medmnist(demo):
    sets = data.load_datasets(demo, "train")
    assert set(sets) == set(data.RATIOS) and len(sets["medmnist"]) == 600
    assert {sets["medmnist"][i].answer for i in range(len(sets["medmnist"]))} == \
        {"melanoma", "melanocytic nevi", "vascular lesions", "bladder", "heart", "liver"}


def test_absent_dataset_skipped_with_one_line_unless_named(demo, tmp_path, capsys):
    root = copy_of(demo, tmp_path, "MedQA")
    assert list(data.load_datasets(root, "train")) == ["medqa"]
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 11 and all("skipping" in line for line in lines)
    with pytest.raises(FileNotFoundError, match=r"pubmedqa: expected .*PubMedQA/train_set.json"):
        data.load_datasets(root, "train", names=["pubmedqa"])


def test_process_text():
    assert data.process_text("  a   b \t\n c  ") == "a b c"
    assert data.process_text("a\tb") == "a\tb"  # a single whitespace character is kept, as officially
    long = " ".join(f"w{i}" for i in range(60))
    assert data.process_text(long).split(" ") == [f"w{i}" for i in range(50)]
    assert data.process_text("Keep Case.") == "Keep Case."


def test_box_to_text_hand_checked():
    assert data.box_to_text([10, 20, 30, 40], (200, 100)) == "{<5><20><20><60>}"
    assert data.box_to_text([1, 1, 1, 1], (3, 3)) == "{<33><33><66><66>}"  # truncated, never rounded up
    assert data.box_to_text([0, 0, 64, 64], (64, 64)) == "{<0><0><100><100>}"
    assert data.box_to_text([6, 5, 27, 21], (80, 64)) == "{<7><7><41><40>}"  # 7.5, 7.8, 41.25, 40.6


def test_box_round_trip():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        W, H = (int(v) for v in torch.randint(20, 1000, (2,), generator=g))
        x, y = int(torch.randint(0, W - 5, (1,), generator=g)), int(torch.randint(0, H - 5, (1,), generator=g))
        w, h = int(torch.randint(1, W - x, (1,), generator=g)), int(torch.randint(1, H - y, (1,), generator=g))
        x1, y1, x2, y2 = data.parse_box(data.box_to_text([x, y, w, h], (W, H)))
        # back to pixels as evaluation does: within one grid cell of the truth
        assert 0 <= x - x1 * W / 100 < W / 100 and 0 <= y - y1 * H / 100 < H / 100
        assert 0 <= x + w - x2 * W / 100 < W / 100 and 0 <= y + h - y2 * H / 100 < H / 100


@pytest.mark.parametrize("text, expected", [
    ("{<1><2><3><4>}", (1, 2, 3, 4)),
    ("{<10><20><100><99>}", (10, 20, 100, 99)),
    ("{ <1> <2><3> <4> }", (1, 2, 3, 4)),            # spaces are removed first
    ("{<1><2><3><4>} is the liver {<9><9><9><9>}", (1, 2, 3, 4)),  # text after is ignored
    ("<unk>{<1><2><3><4>}", (1, 2, 3, 4)),
    ("<1><2><3><4>}", None),                         # missing opening brace
    ("{<1><2><3><4>", None),                         # missing closing brace
    ("{<1000><2><3><4>}", None),                     # 4 digits
    ("{<1><2><3>}", None),                           # fewer than 4 numbers
    ("the box is {<1><2><3><4>}", None),             # must start with the box
    ("", None),
])
def test_parse_box(text, expected):
    assert data.parse_box(text) == expected


# -------------------------------------------------------------------------------------------------
# Templates, copied from the spec (section 5)

SPEC_TEMPLATES = {
    "medqa": ["[qa] {}", "[qa] If you are a doctor, please answer the following question briefly: {}"],
    "pubmedqa": ["[qa] {}",
                 "[qa] If you are a doctor, please answer the following question using 'yes', 'no' or 'maybe': {}"],
    "slake_vqa": ["[vqa] {}", "[vqa] Based on the image, respond to this question with a short answer: {}"],
    "mimic_cxr": ["[caption] " + t for t in [
        "Describe the given chest x-ray image in detail.",
        "Take a look at this chest x-ray and describe the findings and impression.",
        "Could you provide a detailed description of the given x-ray image?",
        "Describe the given chest x-ray image as detailed as possible.",
        "What are the key findings in this chest x-ray image?"]],
    "medpix": ["[caption] " + t for t in [
        "Describe this input image.", "Help captioning the image.", "What can be inflected from the scan?",
        "Can you give a caption for this image?", "Can you provide a brief summary of the radiology image?",
        "Please write a report about the image?", "Can you provide an analysis of this image?",
        "Can you explain what is shown in this image?", "What can be indicated from the radiologic scans?",
        "What can you infer from this photograph?"]],
    "slake_rec": ["[refer] {}", "[refer] give me the location of {}", "[refer] where is {} ?",
                  "[refer] from this image, tell me the location of {}", "[refer] the location of {} is",
                  "[refer] could you tell me the location for {} ?", "[refer] where can I locate the {} ?"],
    "slake_reg": ["[identify] {}", "[identify] what object is in this location {}",
                  "[identify] identify the object present at this location {}", "[identify] what is it in {}",
                  "[identify] describe this object in {}", "[identify] this {} is",
                  "[identify] the object in {} is"],
}
SPEC_TEMPLATES.update(path_vqa=SPEC_TEMPLATES["slake_vqa"], sa_med2d_rec=SPEC_TEMPLATES["slake_rec"],
                      sa_med2d_reg=SPEC_TEMPLATES["slake_reg"])
SPEC_EVAL = {
    "slake_vqa": "[vqa] Based on the image, respond to this question with a short answer: {}",
    "path_vqa": "[vqa] Based on the image, respond to this question with a short answer: {}",
    "mimic_cxr": "[caption] Describe the given chest x-ray image in detail. ",
    "medpix": "[caption] Describe this input image. ",
    "slake_rec": "[refer] give me the location of {}", "sa_med2d_rec": "[refer] give me the location of {}",
    "slake_reg": "[identify] what object is in this location {}",
    "sa_med2d_reg": "[identify] what object is in this location {}",
}
SPEC_CLS = {
    "dermamnist": "[cls] Which category does this multi-source dermatoscopic image of common pigmented skin "
                  "lesions belong to: actinic keratoses and intraepithelial carcinoma, basal cell carcinoma, benign "
                  "keratosis-like lesions, dermatofibroma, melanoma, melanocytic nevi, or vascular lesions?",
    "organsmnist": "[cls] Which category does this CT image belong to: bladder, left femur, right femur, heart, "
                   "left kidney, right kidney, liver, left lung, right lung, pancreas, or spleen?",
}


def test_templates_match_the_spec(demo):
    for name, templates in SPEC_TEMPLATES.items():
        assert data.TEMPLATES[name][0] == templates, name
    for name, template in SPEC_EVAL.items():
        assert data.TEMPLATES[name][1] == template, name
    sets = data.load_datasets(demo, "test", train=False)
    for name, question in SPEC_CLS.items():  # training and evaluation alike: one fixed question
        assert sets[name].get(0).instruction == sets[name].get(0, 0).instruction == question
    s = sets["mimic_cxr"].get(0, 3)
    assert s.instruction == "[caption] Describe the given chest x-ray image as detailed as possible."
    s = sets["sa_med2d_reg"].get(0, 5)
    assert s.instruction == f"[identify] this {data.box_to_text(s.box, s.image_size)} is"


# -------------------------------------------------------------------------------------------------
# The mixture

class Fake:
    """A dataset stand-in: len, templates and get(i, template) are all the Mixture uses."""
    def __init__(self, name, n, templates=3):
        self.name, self.n, self.templates = name, n, [None] * templates

    def __len__(self):
        return self.n

    def get(self, i, template=None):
        return (self.name, i, template)


def next_batch(mix):
    """The samples of the mixture's next draw, as train.py's workers make them."""
    return [mix.datasets[name].get(i, t) for name, i, t in mix.draw()]


def test_mixture_proportions_follow_the_ratios():
    sets = {n: Fake(n, 40) for n in data.RATIOS}
    mix = data.Mixture(sets, data.RATIOS, batch_size=4, seed=1)
    counts = Counter(next_batch(mix)[0][0] for _ in range(20000))
    total = sum(data.RATIOS.values())
    for name, ratio in data.RATIOS.items():
        assert abs(counts[name] / 20000 - ratio / total) < 0.01, (name, counts[name])


def test_mixture_epochs_without_replacement_and_uniform_templates():
    mix = data.Mixture({"medqa": Fake("medqa", 10, templates=2)}, {"medqa": 1}, batch_size=4, seed=0)
    epochs = [[b for _ in range(2) for b in next_batch(mix)] for _ in range(50)]  # 10 // 4 = 2 batches
    for seen in epochs:
        assert len({i for _, i, _ in seen}) == 8  # drop_last: 8 distinct of 10 per epoch
    assert len({tuple(i for _, i, _ in e) for e in epochs}) > 40  # reshuffled every epoch
    templates = Counter(t for e in epochs for _, _, t in e)
    assert set(templates) == {0, 1} and abs(templates[0] - templates[1]) < 0.15 * 800


def test_mixture_resumes_exactly(demo, tmp_path):
    def run():
        return data.Mixture(data.load_datasets(demo, "train"), data.RATIOS, batch_size=4, seed=7)
    key = lambda batch: [(s.id, s.instruction, s.answer) for s in batch]
    a = run()
    for _ in range(400):  # MedQA's 12 batches take 2/50 of the draws: an epoch ends by draw ~300
        next_batch(a)
    assert max(a.state_dict()["epoch"]) >= 1  # the resume point lies past an epoch boundary
    torch.save(a.state_dict(), tmp_path / "mix.pt")
    expected = [key(next_batch(a)) for _ in range(60)]
    b = run()
    b.load_state_dict(torch.load(tmp_path / "mix.pt", weights_only=True))
    assert [key(next_batch(b)) for _ in range(60)] == expected
    assert len({batch[0][0].split("/")[0] for batch in expected}) > 5  # many datasets took part
    fresh = run()
    assert [key(next_batch(fresh)) for _ in range(5)] != expected[:5]
    with pytest.raises(ValueError, match="'seed' is 7 in the checkpoint but 8"):
        data.Mixture(data.load_datasets(demo, "train"), data.RATIOS, seed=8).load_state_dict(a.state_dict())


def test_mixture_batches_come_from_one_dataset(demo):
    mix = data.Mixture(data.load_datasets(demo, "train"), data.RATIOS, batch_size=4, seed=3)
    for _ in range(30):
        batch = next_batch(mix)
        assert len({s.task for s in batch}) == 1 and len(batch) == 4


# -------------------------------------------------------------------------------------------------
# Batching

def test_collate(demo):
    sets = data.load_datasets(demo, "test", train=False)
    batch = data.collate([sets["slake_rec"][i] for i in range(4)], image_size=32)
    assert batch.images.shape == (4, 3, 32, 32) and batch.task == "refer"
    assert batch.answers == [sets["slake_rec"][i].answer for i in range(4)]
    qa = data.collate([sets["pubmedqa"][i] for i in range(3)])
    assert qa.images is None and qa.task == "qa" and len(qa.instructions) == 3
    with pytest.raises(ValueError, match="one task"):
        data.collate([sets["pubmedqa"][0], sets["slake_rec"][0]])


# -------------------------------------------------------------------------------------------------
# Bad data: every error names the file and the row

def test_malformed_rows(demo, tmp_path):
    root = copy_of(demo, tmp_path, "MedQA")
    path = os.path.join(root, "MedQA/questions/US/train.jsonl")
    lines = open(path).read().splitlines()
    open(path, "w").write("\n".join([lines[0], json.dumps({"question": "q"})] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl, row 1: malformed row, missing key 'answer'"):
        data.load_datasets(root, "train", names=["medqa"])
    open(path, "w").write(lines[0] + "\n{not json\n")
    with pytest.raises(ValueError, match=r"train.jsonl, row 1: malformed row, not JSON"):
        data.load_datasets(root, "train", names=["medqa"])


def test_malformed_region_and_missing_file(demo, tmp_path):
    root = copy_of(demo, tmp_path, "Slake-VQA")
    path = os.path.join(root, "Slake-VQA/imgs/xmlab3/detection.json")
    json.dump([{"tumor": [1, 2, 3]}], open(path, "w"))
    with pytest.raises(ValueError, match=r"xmlab3/detection.json, row 0: malformed row, box of 'tumor'"):
        data.load_datasets(root, "train", names=["slake_rec"])
    os.remove(path)
    with pytest.raises(FileNotFoundError, match=r"slake_rec: expected the region file of xmlab3 at .*xmlab3/detect"):
        data.load_datasets(root, "train", names=["slake_rec"])


def test_box_outside_the_image(demo, tmp_path):
    root = copy_of(demo, tmp_path, "SA-Med2D-20M")
    region_dir = os.path.join(root, "SA-Med2D-20M/regions_small_test/ct")
    file = sorted(os.listdir(region_dir))[0]
    json.dump([{"liver": [50, 10, 30, 10]}], open(os.path.join(region_dir, file), "w"))  # 50 + 30 > 64
    ds = data.load_datasets(root, "test", names=["sa_med2d_rec"])["sa_med2d_rec"]
    with pytest.raises(ValueError, match=rf"{file}, row 0: box .* outside the 64x64 image"):
        ds[0]


def test_unreadable_and_missing_image(demo, tmp_path):
    root = copy_of(demo, tmp_path, "Slake-VQA")
    image = os.path.join(root, "Slake-VQA/imgs/xmlab0/source.jpg")
    open(image, "wb").write(b"not a jpeg")
    ds = data.load_datasets(root, "train", names=["slake_vqa"])["slake_vqa"]
    with pytest.raises(ValueError, match=r"question.json, row 0: .*xmlab0/source.jpg: not an image"):
        ds[0]
    os.remove(image)
    with pytest.raises(FileNotFoundError, match=r"question.json, row 0: image not found at .*xmlab0/source"):
        ds[0]


def test_path_vqa_pickle_refuses_globals(demo, tmp_path):
    root = copy_of(demo, tmp_path, "Path-VQA")
    path = os.path.join(root, "Path-VQA/qas/train_vqa.pkl")
    rows = pickle.load(open(path, "rb"))
    rows[0]["label"] = OrderedDict(rows[0]["label"])  # harmless, but a global all the same
    pickle.dump(rows, open(path, "wb"))
    with pytest.raises(ValueError, match=r"train_vqa.pkl: refused global 'collections.OrderedDict'"):
        data.load_datasets(root, "train", names=["path_vqa"])
    rows[0]["label"] = {}
    pickle.dump(rows, open(path, "wb"), protocol=2)  # old protocol: plain containers still load
    with pytest.raises(ValueError, match=r"train_vqa.pkl, row 0: malformed row, 'label'"):
        data.load_datasets(root, "train", names=["path_vqa"])


def test_mimic_rows_without_image_are_skipped(demo, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(os.path.join(demo, "MIMIC_caption"), root / "MIMIC_caption")
    shutil.copytree(os.path.join(demo, "MIMIC-CXR-JPG"), root / "MIMIC-CXR-JPG")
    first = json.load(open(root / "MIMIC_caption/annotation.json"))["test"][0]["image_path"][0]
    os.remove(root / "MIMIC-CXR-JPG/2.0.0/files" / first)
    assert len(data.load_datasets(str(root), "test", names=["mimic_cxr"])["mimic_cxr"]) == 99
    assert "skipped 1 rows" in capsys.readouterr().err


def test_mimic_splits_read_two_files(demo, tmp_path):
    """Training reads annotation_small.json ["train"] (the dataset config), the test split
    annotation.json ["test"] (eval_caption.py); each file's other split is never read."""
    root = tmp_path / "root"
    shutil.copytree(os.path.join(demo, "MIMIC-CXR-JPG"), root / "MIMIC-CXR-JPG")
    small = json.load(open(os.path.join(demo, "MIMIC_caption/annotation_small.json")))["train"]
    full = json.load(open(os.path.join(demo, "MIMIC_caption/annotation.json")))["test"]
    (root / "MIMIC_caption").mkdir()
    # each file also holds the other split, made of the rows that must not be read
    json.dump({"train": small[:5], "test": small[5:8]}, open(root / "MIMIC_caption/annotation_small.json", "w"))
    json.dump({"train": full[:4], "test": full[4:10]}, open(root / "MIMIC_caption/annotation.json", "w"))
    for split, want in (("train", small[:5]), ("test", full[4:10])):
        ds = data.load_datasets(str(root), split, names=["mimic_cxr"])["mimic_cxr"]
        assert [ds[i].answer for i in range(len(ds))] == [data.process_text(r["report"]) for r in want], split
        assert [r.id for r in ds.rows] == [f"mimic_cxr/{r['image_path'][0]}" for r in want], split


def test_medpix_keeps_a_cell_reading_none(demo, tmp_path):
    """pandas 1.5.3 (the official environment) reads the cell None as text, so dropna() keeps the
    row; the other default NaN spellings, and empty cells, drop it."""
    root = copy_of(demo, tmp_path, "MedPix")
    path = os.path.join(root, "MedPix/data_csv/MedPix_single_train.csv")
    lines = open(path).read().splitlines()
    names = [line.split(",")[0] for line in lines[1:5]]
    lines += [f"{names[0]},None,caption", f"{names[1]},NA,caption", f"{names[2]},nan,caption",
              f"{names[3]},NULL,caption", "None,a caption whose image is missing,caption"]
    open(path, "w").write("\n".join(lines) + "\n")
    ds = data.load_datasets(root, "train", names=["medpix"])["medpix"]
    assert len(ds) == 320 + 1 and ds[320].answer == "None" and ds.rows[320].id == f"medpix/{names[0]}"
    test = data.load_datasets(demo, "test", names=["medpix"])["medpix"]  # the demo writes one such row
    assert [test[i].answer for i in range(len(test))].count("None") == 1


# -------------------------------------------------------------------------------------------------
# Every kind of file a loader reads, damaged: loading, or the check before training, names it

DATASET_FILES = [  # (dataset, a file it reads, as a glob under the data root)
    ("medqa", "MedQA/questions/US/train.jsonl"),
    ("pubmedqa", "PubMedQA/train_set.json"),
    ("slake_vqa", "Slake-VQA/imgs/xmlab3/question.json"),
    ("slake_rec", "Slake-VQA/imgs/xmlab3/detection.json"),
    ("slake_vqa", "Slake-VQA/imgs/xmlab0/source.jpg"),
    ("path_vqa", "Path-VQA/qas/train_vqa.pkl"),
    ("path_vqa", "Path-VQA/images/train/train_0000.jpg"),
    ("mimic_cxr", "MIMIC_caption/annotation_small.json"),
    ("mimic_cxr", "MIMIC-CXR-JPG/2.0.0/files/*/*/*/*.jpg"),
    ("medpix", "MedPix/data_csv/MedPix_single_train.csv"),
    ("medpix", "MedPix/MedPix/images/*.png"),
    ("sa_med2d_rec", "SA-Med2D-20M/regions_small_train/ct/*.json"),
    ("sa_med2d_reg", "SA-Med2D-20M/images_small_train/mr/*.png"),
    ("dermamnist", "MedMNIST/dermamnist_224.npz"),
]


def problems_of(root, name):
    """What a user sees: the error of loading, or the problems check_datasets lists."""
    try:
        datasets = data.load_datasets(root, "train", names=[name], train=False)
    except (ValueError, OSError) as e:
        return [str(e)]
    return data.check_datasets(datasets)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
@pytest.mark.parametrize("name, pattern", DATASET_FILES, ids=[p.split("/")[-1] for _, p in DATASET_FILES])
def test_every_damaged_dataset_file_is_named(demo, tmp_path, name, pattern, damage):
    root = str(tmp_path / "root")
    shutil.copytree(demo, root)
    assert problems_of(root, name) == []
    path = sorted(glob.glob(os.path.join(root, pattern)))[0]
    raw = open(path, "rb").read()
    # cut inside a line (a text file cut at a line end is whole as far as anyone can tell), and in a
    # CSV before its last cell (a row cut in its last cell is still a whole row: "capt", not a caption)
    cut = len(raw) // 2
    if path.endswith((".jsonl", ".csv")):
        cut = raw.index(b"\n", cut) - (20 if path.endswith(".csv") else 5)
    open(path, "wb").write(raw[:cut] if damage == "truncated" else np.random.default_rng(0).bytes(len(raw)))
    problems = problems_of(root, name)
    assert len(problems) == 1 and path in problems[0], problems


def test_check_reports_every_problem_at_once(demo, tmp_path):
    root = copy_of(demo, tmp_path, "Slake-VQA")
    imgs = os.path.join(root, "Slake-VQA/imgs")
    os.remove(os.path.join(imgs, "xmlab0/source.jpg"))  # 3 English questions ask about it
    raw = open(os.path.join(imgs, "xmlab1/source.jpg"), "rb").read()
    open(os.path.join(imgs, "xmlab1/source.jpg"), "wb").write(raw[: len(raw) // 2])  # cut short
    json.dump([{"tumor": [50, 10, 30, 10]}, {"kidney": [1, 1, 5, 5]}], open(os.path.join(imgs, "xmlab2/detection.json"), "w"))
    datasets = data.load_datasets(root, "train", names=["slake_vqa", "slake_rec", "slake_reg"], train=False)
    problems = data.check_datasets(datasets)
    # each bad image once (at the first row that asks for it, in any dataset), each bad box per row
    assert len(problems) == 4, problems
    assert sum("xmlab0/question.json, row 0: image not found at" in p and "xmlab0/source.jpg" in p for p in problems) == 1
    assert sum("xmlab1/source.jpg: not a readable image (truncated?)" in p for p in problems) == 1
    assert sum("xmlab2/detection.json, row 0: box" in p and "outside the 64x64 image" in p for p in problems) == 2
    # two processes share the rows and together find the same problems
    shares = data.check_datasets(datasets, 0, 2) + data.check_datasets(datasets, 1, 2)
    assert {p for p in shares if "box" in p} == {p for p in problems if "box" in p}


# -------------------------------------------------------------------------------------------------
# The demo itself

def tree(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            out[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_make_demo_is_deterministic(demo, tmp_path):
    make_demo(str(tmp_path / "again"), seed=0)
    assert tree(str(tmp_path / "again")) == tree(demo)
    assert not any(f.endswith(".tmp") for f in tree(demo))
    make_demo(str(tmp_path / "other"), seed=1)
    other = tree(str(tmp_path / "other"))
    assert other != tree(demo)


def test_demo_train_and_test_are_disjoint(demo):
    train = data.load_datasets(demo, "train", train=False)
    test = data.load_datasets(demo, "test", train=False)
    for name in data.DATASETS:
        a = [train[name][i] for i in range(len(train[name]))]
        b = [test[name][i] for i in range(len(test[name]))]
        assert not {s.id for s in a} & {s.id for s in b}, name
        if name in ("medqa", "pubmedqa"):
            assert not {s.instruction for s in a} & {s.instruction for s in b}, name
        else:
            pixels = lambda ss: {hashlib.sha256(s.image.tobytes()).hexdigest() for s in ss}
            assert not pixels(a) & pixels(b), name
    assert set(DEMO_CLAIMS) == set(data.DATASETS)


def test_demo_claims_chance_is_the_best_constant_answer(demo):
    """The chance level each claim is measured from (DEMO_CLAIMS) is what always giving the most
    frequent answer scores on the test split, with evaluate's own metrics (for the reports, the most
    frequent training report). VQA's and REC's are structural: 2 answers per question, 4 quadrants."""
    train = data.load_datasets(demo, "train", train=False)
    test = data.load_datasets(demo, "test", train=False)
    for name, (metric, chance, _, _) in DEMO_CLAIMS.items():
        refs = [test[name].get(i).answer for i in range(len(test[name]))]
        if name in ("mimic_cxr", "medpix"):
            constant = Counter(train[name].get(i).answer for i in range(len(train[name]))).most_common(1)[0][0]
            records = [{"reference": r, "prediction": constant} for r in refs]
            assert round(metrics.score_dataset("caption", records)[metric], 1) == chance, name
        elif metric == "acc":
            assert 100 * max(Counter(refs).values()) / len(refs) == pytest.approx(chance), name


def test_demo_boxes_put_every_object_in_every_quadrant(demo):
    """REC and REG are learnable only if where an object lies is not given away by its name: in
    each split every named object sits in each of the 4 quadrants about equally often. (SA-Med2D
    once put its liver only on the left in training and only on the right in half of the test.)"""
    for name in ("slake_rec", "sa_med2d_rec"):
        for split in ("train", "test"):
            ds = data.load_datasets(demo, split, names=[name], train=False)[name]
            quadrants = Counter()
            for i in range(len(ds)):
                s = ds.get(i)
                (x, y, w, h), (W, H) = s.box, s.image_size
                quadrants[s.instruction.split()[-1], (x + w / 2) / W > 0.5, (y + h / 2) / H > 0.5] += 1
            for obj in {key[0] for key in quadrants}:
                counts = [quadrants[obj, right, lower] for right in (False, True) for lower in (False, True)]
                assert min(counts) >= 0.15 * sum(counts), (name, split, obj, counts)


def test_demo_tokenizer_reads_training_and_evaluation_prompts_alike(demo, tmp_path):
    """Training writes two spaces before [/INST] and evaluation one (build_prompt); the demo's
    tokenizer folds runs of spaces, so the tiny LLaMA sees one prompt, as a real LLaMA in effect does."""
    write_tokenizer(demo_texts(demo), str(tmp_path / "tokenizer.model"), 640)
    tokenizer = Tokenizer(str(tmp_path / "tokenizer.model"))
    assert (tokenizer.bos_id, tokenizer.eos_id) == (1, 2)
    for instruction in ("[identify] what object is in this location {<7><57><40><90>}",
                        "[caption] Describe this input image. "):
        train, evaluation = (build_prompt(instruction, True, train=t) for t in (True, False))
        assert train != evaluation
        assert tokenizer.encode(train) == tokenizer.encode(evaluation)
    assert tokenizer.decode(tokenizer.encode("the left lung")) == "the left lung"


def test_sincos_position_embeddings_say_row_and_column():
    """demo.sincos_2d: the first half of the channels depends on the patch's row only, the second
    on its column only; neighbouring patches are closer than far ones; std about 0.5."""
    grid, dim = 8, 96
    e = sincos_2d(grid, dim).reshape(grid, grid, dim)
    assert torch.equal(e[:, :1, : dim // 2].expand(grid, grid, dim // 2), e[..., : dim // 2])
    assert torch.equal(e[:1, :, dim // 2:].expand(grid, grid, dim // 2), e[..., dim // 2:])
    assert (e[0, 0] - e[0, 1]).norm() < (e[0, 0] - e[0, 7]).norm()
    assert 0.4 < e.std().item() < 0.7


def test_demo_text_covers_templates_and_answers(demo):
    """The text the demo's tokenizer and tiny LLaMA learn from (demo.demo_texts) holds every
    training template (both sides of its slot) and the answers."""
    text = "\n".join(demo_texts(demo))
    for name in data.DATASETS:
        for template in data.TEMPLATES[name][0]:
            assert all(part.strip() in text for part in template.split("{}")), template
    assert "melanocytic nevi" in text and "pleural effusion" in text and "{<" in text
