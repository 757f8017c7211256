"""The offline demonstration: a generated shapes dataset with known object masks (`demo.shapes`) and the
narrow VGG trained on it (`demo.train`), whose committed weights are `lrp_module/weights/vgg-shapes.pt`."""
