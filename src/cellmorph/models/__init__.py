"""Networks: model names and weight sources, the timm factory, the zoo (LeNet, GenderNet), training,
augmentation, frozen features and heads, the network-level Classifier and model bundles."""
