"""What the loop trains: MAE pretraining (with its online probe), fine-tuning and linear probing."""
