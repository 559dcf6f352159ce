from caat_peft.cli import main

raise SystemExit(main())
