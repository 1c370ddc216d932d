"""What is in the store: the key layout, commit manifests and job metadata, read and written the
same way by the uploader, restore and the browsing commands."""
