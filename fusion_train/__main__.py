from fusion_train.cli import main

main()
