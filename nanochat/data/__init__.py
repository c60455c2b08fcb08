"""Data of the core: parquet shards and data sources (dataset.py), pretraining rows and their exact
resume positions (dataloader.py), and rendered conversations of the chat stages (chat_data.py).
Acquiring data (the embedded pack's downloads) lives outside the core, in jobs/datapack.py."""
