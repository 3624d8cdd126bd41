//! Times the symmetric eigendecomposition that publishes the PCA, at d = 1280 (the
//! EfficientNet-Lite0 embedding size), with faer (used; also on one thread and for the
//! eigenvalues alone) and nalgebra (the batch twin):
//! `cargo run --release --example eigen_bench [D]`.

use std::time::Instant;

fn main() {
    let d: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1280);
    // A correlation-like SPD matrix: X^T X / n over pseudo-random data.
    let n = 2 * d;
    let mut s = 42u64;
    let x: Vec<f64> = (0..n * d)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64
        })
        .collect();
    let m = nalgebra::DMatrix::from_row_slice(n, d, &x);
    let c = (m.transpose() * &m) / n as f64;

    let f = faer::Mat::<f64>::from_fn(d, d, |i, j| c[(i, j)]);
    let t = Instant::now();
    let evd = f.self_adjoint_eigen(faer::Side::Lower).unwrap();
    let faer_s = t.elapsed().as_secs_f64();
    let top_faer = evd.S().column_vector()[d - 1];
    // The floor for any exact method that tridiagonalises: eigenvalues alone.
    let t = Instant::now();
    f.self_adjoint_eigenvalues(faer::Side::Lower).unwrap();
    let values_s = t.elapsed().as_secs_f64();
    faer::set_global_parallelism(faer::Par::Seq);
    let t = Instant::now();
    f.self_adjoint_eigen(faer::Side::Lower).unwrap();
    let seq_s = t.elapsed().as_secs_f64();
    faer::set_global_parallelism(faer::Par::rayon(0));

    let t = Instant::now();
    let eig = nalgebra::SymmetricEigen::new(c);
    let nalgebra_s = t.elapsed().as_secs_f64();
    let top_nalgebra = eig.eigenvalues.iter().copied().fold(f64::MIN, f64::max);

    println!("d = {d}");
    println!("faer self_adjoint_eigen:   {faer_s:.3} s (largest eigenvalue {top_faer:.6})");
    println!("  the same on 1 thread:    {seq_s:.3} s");
    println!("  eigenvalues only:        {values_s:.3} s");
    println!("nalgebra SymmetricEigen:   {nalgebra_s:.3} s (largest eigenvalue {top_nalgebra:.6})");
}
