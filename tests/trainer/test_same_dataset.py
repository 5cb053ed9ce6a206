"""data.sameDatasetWithinBatch: every batch takes its queries from one training file."""

import torch

from embedtune.trainer.contract import TrainerConfig
from embedtune.trainer.data import prepare_training_data
from embedtune.trainer.false_negatives import false_negatives
from embedtune.trainer.runner import EmbedtuneRunner, build_model_and_data_arguments, build_training_arguments
from support.tiny import synthetic_records, write_jsonl


def test_each_batch_takes_its_queries_from_one_training_file(tiny_model, tmp_path):
    alpha = synthetic_records(10, seed=1)
    beta = [r | {"query": r["query"].replace("what is", "about")} for r in synthetic_records(13, seed=2)]
    config = TrainerConfig.model_validate(
        {
            "model": {"base": str(tiny_model), "queryMaxLength": 16, "passageMaxLength": 16},
            "data": {
                "train": [str(write_jsonl(tmp_path / "a.jsonl", alpha)), str(write_jsonl(tmp_path / "b.jsonl", beta))],
                "sameDatasetWithinBatch": True,
            },
            "training": {"batchSizePerDevice": 4, "groupSize": 2},
            "storage": {"uri": str(tmp_path / "store")},
        }
    )
    prepared = prepare_training_data(config.data, 2, 42, tmp_path / "data")
    assert sorted(f.name for f in prepared.train_file.iterdir()) == ["00000.jsonl", "00001.jsonl"]

    args = build_training_arguments(config, tmp_path / "out")
    model_args, data_args = build_model_and_data_arguments(config, str(tiny_model), prepared.train_file)
    runner = EmbedtuneRunner(model_args, data_args, args, callbacks=[])
    queries = [
        runner.tokenizer.batch_decode(batch["queries"]["input_ids"], skip_special_tokens=True)
        for batch in runner.trainer.get_train_dataloader()
    ]
    # full batches of 4 only: 2 of the 10 alpha queries, 3 of the 13 beta ones (partial ones dropped)
    assert sorted(len(batch) for batch in queries) == [4] * 5
    first_words = sorted(" ".join(sorted({text.split()[0] for text in batch})) for batch in queries)
    assert first_words == ["about"] * 3 + ["what"] * 2  # one file per batch, no "None" instruction prefix


def test_batches_from_one_file_mask_false_negatives(tiny_model, tmp_path):
    records = synthetic_records(8, seed=3)
    for index, record in enumerate(records):  # two answers, each shared by four queries
        record["pos"] = [records[index % 2]["pos"][0]]
    config = TrainerConfig.model_validate(
        {
            "model": {"base": str(tiny_model), "queryMaxLength": 16, "passageMaxLength": 16},
            "data": {"train": str(write_jsonl(tmp_path / "a.jsonl", records)), "sameDatasetWithinBatch": True},
            "training": {"batchSizePerDevice": 4, "groupSize": 2},
            "storage": {"uri": str(tmp_path / "store")},
        }
    )
    prepared = prepare_training_data(config.data, 0, 42, tmp_path / "data")
    model_args, data_args = build_model_and_data_arguments(config, str(tiny_model), prepared.train_file)
    runner = EmbedtuneRunner(model_args, data_args, build_training_arguments(config, tmp_path / "out"), callbacks=[])
    item = runner.train_dataset[0]
    queries, passages = item[0], item[1]
    batch = runner.data_collator([item])
    positives = {record["query"]: record["pos"] for record in records}
    expected = torch.tensor(
        [
            [j != 2 * i and passage in positives[query] for j, passage in enumerate(passages)]
            for i, query in enumerate(queries)
        ]
    )
    masked = false_negatives(batch["passage_hashes"], batch["positive_hashes"])
    assert expected.any() and torch.equal(masked, expected)
    runner.model.train()
    assert torch.isfinite(runner.model(**batch).loss)
