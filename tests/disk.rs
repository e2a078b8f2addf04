//! A full disk and a read-only directory under a training run: the error names the path, and
//! the checkpoint that was there stays whole and usable. Both are made for real on a small
//! tmpfs inside a private mount namespace (`unshare -m`), which needs root; elsewhere the test
//! says it was skipped.

mod common;

use common::{tiny_corpus, train_tiny, TINY_MODEL};
use std::process::Command;

/// Runs in the namespace: mounts a 4 MiB tmpfs on $MNT, copies the checkpoint $SRC/ck into it,
/// fills the disk to its last 64 KiB, resumes training there (its save cannot fit), then checks
/// the old files and generates from them, then remounts read-only and resumes again.
/// Results go to files under $SRC, which is on the real disk.
const SCRIPT: &str = r#"
set -u
mount -t tmpfs -o size=4m tmpfs "$MNT" || exit 77
cp -a "$SRC/ck" "$MNT/ck"
head -c 65536 /dev/zero > "$MNT/reserve"
dd if=/dev/zero of="$MNT/fill" bs=4096 2>/dev/null
rm "$MNT/reserve"
"$BIN" train "$CORPUS" $FLAGS --resume --epochs 4 --out "$MNT/ck" >/dev/null 2>"$SRC/full.err"
echo $? > "$SRC/full.rc"
rm "$MNT/fill"
for f in model.safetensors last.safetensors state.json tokenizer.json; do
  cmp -s "$SRC/ck/$f" "$MNT/ck/$f" || echo "$f" >> "$SRC/changed"
done
ls -a "$MNT/ck" > "$SRC/listing"
"$BIN" generate -n 2 --seed 1 --checkpoint "$MNT/ck" > "$SRC/gen.out" 2>&1
echo $? > "$SRC/gen.rc"
mount -o remount,ro "$MNT"
"$BIN" train "$CORPUS" $FLAGS --resume --epochs 4 --out "$MNT/ck" >/dev/null 2>"$SRC/ro.err"
echo $? > "$SRC/ro.rc"
exit 0
"#;

fn read(dir: &std::path::Path, name: &str) -> String {
    std::fs::read_to_string(dir.join(name)).unwrap_or_default()
}

#[test]
fn a_full_disk_or_read_only_directory_is_an_error_naming_the_path_and_keeps_the_checkpoint() {
    let unshare_works = Command::new("unshare")
        .args(["-m", "true"])
        .status()
        .is_ok_and(|s| s.success());
    if !unshare_works {
        eprintln!("SKIPPED: needs root and `unshare -m` to mount a small tmpfs");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path();
    train_tiny(src, &["--out", "ck", "--epochs", "1"]).ok();
    let mnt = src.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let status = Command::new("unshare")
        .args(["-m", "sh", "-c", SCRIPT])
        .env("BIN", env!("CARGO_BIN_EXE_textvae"))
        .env("CORPUS", tiny_corpus())
        .env("FLAGS", TINY_MODEL.join(" "))
        .env("SRC", src)
        .env("MNT", &mnt)
        .status()
        .unwrap();
    if status.code() == Some(77) {
        eprintln!("SKIPPED: mounting a tmpfs in a private namespace is not allowed here");
        return;
    }
    assert!(status.success(), "script failed: {status:?}");

    let full = read(src, "full.err");
    assert_eq!(read(src, "full.rc").trim(), "1", "{full}");
    assert!(full.contains("No space left on device"), "{full}");
    let saving = format!("saving {}", mnt.join("ck").display());
    assert!(full.contains(&saving), "{full}");
    assert!(!full.contains("panicked"), "{full}");
    assert_eq!(read(src, "changed"), "", "files changed by the failed save");
    let listing = read(src, "listing");
    assert!(!listing.contains(".tmp"), "a temp file was left: {listing}");
    assert_eq!(read(src, "gen.rc").trim(), "0", "{}", read(src, "gen.out"));
    assert_eq!(read(src, "gen.out").lines().count(), 2);

    let ro = read(src, "ro.err");
    assert_eq!(read(src, "ro.rc").trim(), "1", "{ro}");
    assert!(ro.contains("Read-only file system"), "{ro}");
    assert!(ro.contains(&mnt.join("ck").display().to_string()), "{ro}");
}
