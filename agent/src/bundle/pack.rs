//! `shoal bundle create`: packs a directory into an archive whose format follows the output
//! name (`.tar`, `.tar.gz`/`.tgz`, `.tar.zst`/`.tzst`, `.zip`). The archive is
//! deterministic (sorted entries, zero timestamps and owners), and the directory is held to
//! the same rules as an unpacked bundle, so what packs also unpacks.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use super::{BundleError, Limits, RevisionId, tree_id, unpack};

enum Format {
    Tar,
    TarGz,
    TarZst,
    Zip,
}

fn format_of(out: &Path) -> Option<Format> {
    let name = out.file_name()?.to_str()?.to_ascii_lowercase();
    if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some(Format::TarGz)
    } else if name.ends_with(".tar.zst") || name.ends_with(".tzst") {
        Some(Format::TarZst)
    } else if name.ends_with(".tar") {
        Some(Format::Tar)
    } else if name.ends_with(".zip") {
        Some(Format::Zip)
    } else {
        None
    }
}

fn io_err(entry: &str) -> impl Fn(std::io::Error) -> BundleError + '_ {
    move |source| BundleError::Io {
        entry: entry.to_string(),
        source,
    }
}

/// Packs `dir` into `out` and returns the revision id.
pub fn create(dir: &Path, out: &Path) -> Result<RevisionId, BundleError> {
    let format = format_of(out).ok_or_else(|| BundleError::OutputName {
        path: out.to_path_buf(),
    })?;
    if !dir.join("appspec.yml").is_file() {
        return Err(BundleError::NoAppSpec);
    }
    // Hold the directory to the unpacking rules first: copy it through the extractor into
    // a scratch directory, and pack that copy.
    let scratch = tempfile::tempdir().map_err(io_err("a scratch directory"))?;
    let checked = scratch.path().join("revision");
    unpack::unpack(dir, &checked, &Limits::default())?;
    let id = tree_id(&checked)?;

    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp =
        tempfile::NamedTempFile::new_in(parent).map_err(io_err(&out.display().to_string()))?;
    let writer = BufWriter::new(tmp.as_file().try_clone().map_err(io_err("the output"))?);
    match format {
        Format::Tar => write_tar(&checked, writer)?
            .flush()
            .map_err(io_err("the output"))?,
        Format::TarGz => {
            let gz = flate2::write::GzEncoder::new(writer, flate2::Compression::default());
            write_tar(&checked, gz)?
                .finish()
                .map_err(io_err("the output"))?
                .flush()
                .map_err(io_err("the output"))?
        }
        Format::TarZst => {
            let zst = zstd::Encoder::new(writer, 3).map_err(io_err("the output"))?;
            write_tar(&checked, zst)?
                .finish()
                .map_err(io_err("the output"))?
                .flush()
                .map_err(io_err("the output"))?
        }
        Format::Zip => write_zip(&checked, writer)?,
    }
    tmp.as_file().sync_all().map_err(io_err("the output"))?;
    tmp.persist(out)
        .map_err(|e| io_err(&out.display().to_string())(e.error))?;
    Ok(id)
}

fn sorted_entries(root: &Path) -> impl Iterator<Item = walkdir::Result<walkdir::DirEntry>> {
    walkdir::WalkDir::new(root)
        .follow_links(false)
        .sort_by_file_name()
        .min_depth(1)
        .into_iter()
}

fn write_tar<W: Write>(root: &Path, w: W) -> Result<W, BundleError> {
    use std::os::unix::fs::PermissionsExt;
    let mut tar = tar::Builder::new(w);
    tar.mode(tar::HeaderMode::Deterministic);
    tar.follow_symlinks(false);
    for entry in sorted_entries(root) {
        let entry = entry.map_err(|e| io_err("walking the revision")(e.into()))?;
        let name = entry
            .path()
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        let t = entry.file_type();
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if t.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            tar.append_data(&mut header, format!("{name}/"), std::io::empty())
                .map_err(io_err(&name))?;
        } else if t.is_symlink() {
            let target = std::fs::read_link(entry.path()).map_err(io_err(&name))?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            tar.append_link(&mut header, &name, &target)
                .map_err(io_err(&name))?;
        } else {
            let file = File::open(entry.path()).map_err(io_err(&name))?;
            let meta = file.metadata().map_err(io_err(&name))?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(if meta.permissions().mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            });
            header.set_size(meta.len());
            tar.append_data(&mut header, &name, file)
                .map_err(io_err(&name))?;
        }
    }
    tar.into_inner()
        .map_err(io_err("finishing the tar archive"))
}

fn write_zip<W: Write + std::io::Seek>(root: &Path, w: W) -> Result<(), BundleError> {
    use std::os::unix::fs::PermissionsExt;
    use zip::write::SimpleFileOptions;
    let zip_err = |what: &str| {
        let what = what.to_string();
        move |e: zip::result::ZipError| BundleError::Archive {
            what: what.clone(),
            source: Box::new(e),
        }
    };
    let mut zip = zip::ZipWriter::new(w);
    let base = SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .last_modified_time(zip::DateTime::default());
    for entry in sorted_entries(root) {
        let entry = entry.map_err(|e| io_err("walking the revision")(e.into()))?;
        let name = entry
            .path()
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        let t = entry.file_type();
        if t.is_dir() {
            zip.add_directory(&name, base.unix_permissions(0o755))
                .map_err(zip_err(&name))?;
        } else if t.is_symlink() {
            let target = std::fs::read_link(entry.path()).map_err(io_err(&name))?;
            zip.add_symlink(&name, target.to_string_lossy(), base)
                .map_err(zip_err(&name))?;
        } else {
            let mut file = File::open(entry.path()).map_err(io_err(&name))?;
            let exec = file.metadata().map_err(io_err(&name))?.permissions().mode() & 0o111 != 0;
            zip.start_file(
                &name,
                base.unix_permissions(if exec { 0o755 } else { 0o644 })
                    .large_file(true),
            )
            .map_err(zip_err(&name))?;
            std::io::copy(&mut file, &mut zip).map_err(io_err(&name))?;
        }
    }
    zip.finish().map_err(zip_err("finishing the zip archive"))?;
    Ok(())
}
