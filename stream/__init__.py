"""The SpaceNet streaming service: Kafka in, sparse task training, predictions and metrics out."""
