from dicom_ai.cli import main

raise SystemExit(main())
