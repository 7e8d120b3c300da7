// Draws binned attention weights (NaN = masked) on a canvas with a log colour scale.

// Viridis, sampled at 9 stops: perceptually even, readable in grey, fine for colour blindness.
const STOPS = [
  [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
];
const MASKED = [52, 52, 58];
// Decades of weight the scale shows below the largest cell.
const DECADES = 5;

export function colour(t) {
  const x = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  return STOPS[i].map((c, k) => Math.round(c + f * (STOPS[i + 1][k] - c)));
}

// Returns the log10 range drawn: { lo, hi } (lo = hi - DECADES at most).
export function drawHeatmap(canvas, map) {
  const { rows, cols, values } = map;
  let hi = -Infinity;
  let lo = Infinity;
  for (const v of values) {
    if (Number.isFinite(v) && v > 0) {
      const l = Math.log10(v);
      hi = Math.max(hi, l);
      lo = Math.min(lo, l);
    }
  }
  if (!Number.isFinite(hi)) {
    hi = 0;
    lo = -1;
  }
  lo = Math.max(lo, hi - DECADES);
  if (hi - lo < 1e-6) lo = hi - 1; // uniform weights: one flat colour, not a division by 0
  canvas.width = cols;
  canvas.height = rows;
  const ctx = canvas.getContext('2d');
  const img = ctx.createImageData(cols, rows);
  for (let i = 0; i < rows * cols; i++) {
    const v = values[i];
    const rgb = Number.isNaN(v) ? MASKED : colour(v > 0 ? (Math.log10(v) - lo) / (hi - lo) : 0);
    img.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * i);
  }
  ctx.putImageData(img, 0, 0);
  return { lo, hi };
}

export function drawColourbar(canvas) {
  const ctx = canvas.getContext('2d');
  for (let x = 0; x < canvas.width; x++) {
    const [r, g, b] = colour(x / (canvas.width - 1));
    ctx.fillStyle = `rgb(${r},${g},${b})`;
    ctx.fillRect(x, 0, 1, canvas.height);
  }
}
