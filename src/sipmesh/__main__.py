from sipmesh.cli.main import main

raise SystemExit(main())
