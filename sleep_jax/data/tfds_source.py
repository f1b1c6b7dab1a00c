"""Text datasets in tensorflow-datasets' array_record format, read without TensorFlow.

tfds needs TensorFlow for its default tfrecord files and for `as_dataset`/`tfds.load`; it does not
for array_record files read through `builder.as_data_source()` / `tfds.data_source(...)`, which
give random access (`len`, `[i]`) and so plug straight into `grain.MapDataset.source` and
`pipeline.make_dataset`.

- `build_text_dataset(texts, data_dir)` writes `{"text": ...}` records as an array_record tfds
  dataset (the builder is plain Python and builds its `tfds.core.DatasetInfo` directly), keeping
  the given order.
- `tfds_text_source(name_or_dir, split=...)` opens any such dataset (one built here, or a
  registered tfds dataset prepared with file_format="array_record") as a sequence of str.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import tensorflow_datasets as tfds


class SleepJaxTexts(tfds.core.GeneratorBasedBuilder):
    """A tfds builder for a list of texts given in Python (one "text" feature per record)."""

    VERSION = tfds.core.Version("1.0.0")
    # tfds looks for a checksums file next to a builder's module, which for a module inside a
    # package imports `importlib_resources` (a tfds dependency not always installed); there is
    # nothing to download, so say there is no code path, as for a builder defined in a script.
    code_path = None

    def __init__(self, *, splits: Mapping[str, Sequence[str]] | None = None, **kwargs: Any):
        self._splits = splits
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Texts written by sleep_jax.data.tfds_source.build_text_dataset.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            disable_shuffling=True,  # keep the order the texts were given in
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
        if self._splits is None:
            raise ValueError("SleepJaxTexts needs splits={'train': [...]} to build")
        return {name: self._generate_examples(texts) for name, texts in self._splits.items()}

    def _generate_examples(self, texts: Sequence[str]):
        for i, text in enumerate(texts):
            yield i, {"text": text}


def build_text_dataset(
    texts: Sequence[str] | Mapping[str, Sequence[str]],
    data_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> str:
    """Writes texts as an array_record tfds dataset under `data_dir`.

    Args:
      texts: the "train" split's texts, or {split name: texts}.
      data_dir: the tfds data directory (the dataset goes to data_dir/sleep_jax_texts/1.0.0).
      overwrite: replace a dataset already there; without it an existing one is an error (tfds
        would otherwise silently keep the old texts).

    Returns:
      The dataset directory, which `tfds_text_source` opens.
    """
    splits = {"train": texts} if not isinstance(texts, Mapping) else dict(texts)
    for name, split in splits.items():
        bad = [t for t in split if not isinstance(t, str)]
        if bad:
            raise TypeError(f"split {name!r} holds non-str texts, e.g. {bad[0]!r}")
    builder = SleepJaxTexts(splits=splits, data_dir=os.fspath(data_dir),
                            file_format="array_record")
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    if os.path.exists(os.path.join(builder.data_dir, "dataset_info.json")):
        if not overwrite:
            raise FileExistsError(f"a dataset already exists at {builder.data_dir}; pass "
                                  "overwrite=True or use another data_dir")
        mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    return os.fspath(builder.data_dir)


class TextSource(Sequence[str]):
    """Random access to one string feature of a tfds data source, decoded as UTF-8."""

    def __init__(self, source: Any, key: str = "text"):
        self._source, self._key = source, key

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:  # type: ignore[override]
        n = len(self._source)
        if not -n <= index < n:  # IndexError (not tfds' ValueError) ends Sequence iteration
            raise IndexError(f"index {index} out of range for {n} records")
        value = self._source[index % n][self._key]
        return value.decode("utf-8") if isinstance(value, bytes) else value

    def __repr__(self) -> str:
        return f"TextSource({self._source!r}, key={self._key!r})"


def tfds_text_source(
    name_or_dir: str | os.PathLike,
    *,
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    key: str = "text",
) -> TextSource:
    """Opens the `key` feature of an array_record tfds dataset as a sequence of str.

    Args:
      name_or_dir: a prepared dataset's directory (holding dataset_info.json), or a registered
        tfds name such as "sleep_jax_texts" or "wikipedia/20230601.en" found under `data_dir`.
      split: the split, e.g. "train" or "train[:10%]".
      data_dir: the tfds data directory, for a name.
      key: the string feature to read.

    Returns:
      A `TextSource` (len, [i] -> str) for `grain.MapDataset.source` / `make_dataset`.
    """
    path = os.fspath(name_or_dir)
    if os.path.isfile(os.path.join(path, "dataset_info.json")):
        source = tfds.builder_from_directory(path).as_data_source(split=split)
    else:
        try:
            source = tfds.data_source(path, split=split, try_gcs=False, download=False,
                                      data_dir=None if data_dir is None else os.fspath(data_dir))
        except Exception as e:
            raise FileNotFoundError(
                f"cannot open tfds dataset {path!r} (split {split!r}, data_dir {data_dir!r}) as "
                "an array_record data source: give the prepared dataset's directory, or a name "
                "prepared with file_format='array_record' under data_dir") from e
    return TextSource(source, key)
